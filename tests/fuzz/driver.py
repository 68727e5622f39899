"""Run one fuzz target under atheris (libFuzzer): ``python -m tests.fuzz.driver TARGET
[libFuzzer options] [corpus dirs]``. sealfs is instrumented for coverage; an input that makes
the target raise anything but its allowed errors is a crash (saved, non-zero exit)."""

from __future__ import annotations

import sys

import atheris


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    with atheris.instrument_imports(include=["sealfs"]):
        from tests.fuzz import targets
    if name not in targets.TARGETS:
        sys.exit(f"unknown target {name!r}; targets: {', '.join(targets.TARGETS)}")
    atheris.Setup([sys.argv[0], *sys.argv[2:]], lambda data: targets.check(name, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
