"""The import contract: the README's layers, checked on the source (no sealfs import needed).

Walks the AST of every module under sealfs/ and fails when an import points the wrong way, when
something besides sealfs/crypto.py uses `cryptography` or raw key bytes, or when anything
outside sealfs/cli decides how the process ends. The rules are the tables below; README.md
("Layers") states the same.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SEALFS = Path(__file__).resolve().parents[2] / "sealfs"

#: Every component of sealfs (a top-level module or package) and the components it may import,
#: lowest first: a row names only rows above it, so arrows point down and no cycle can form.
#: "sealfs" is the package's own __init__ (the version).
LAYERS: dict[str, set[str]] = {
    "errors": set(),
    "sealfs": set(),
    "meter": set(),  # how long work reports progress (drawn by cli)
    "strict": {"errors"},
    "crypto": {"errors", "strict"},  # all cryptography; the only module that holds raw keys
    "failpoints": set(),  # crash points for tests (SEALFS_FAILPOINT)
    "store": {"errors", "failpoints"},  # ciphertext objects in and out: no crypto, no keys
    "tarstream": {"errors"},  # the bounded tar of export/import streams
    "sealed": {"errors", "crypto", "store"},  # the one sealed-object layer
    "attest": {"errors", "sealfs", "strict", "crypto"},
    "kms": {"errors", "sealfs", "strict", "crypto", "attest"},
    "volume": {"errors", "sealfs", "strict", "crypto", "store", "sealed", "kms"},
    "fs": {"errors", "failpoints", "meter", "crypto", "store", "sealed", "volume"},
    "check": {"errors", "meter", "crypto", "store", "sealed", "volume", "fs"},
    "migrate": {
        "errors",
        "meter",
        "strict",
        "crypto",
        "store",
        "tarstream",
        "sealed",
        "volume",
        "fs",
        "check",
    },
    "fuse": {"errors", "store", "sealed", "volume", "fs"},
    "luks": {"errors", "sealfs", "failpoints", "meter", "strict", "crypto", "tarstream", "kms"},
    "init": {
        "errors",
        "failpoints",
        "strict",
        "attest",
        "kms",
        "store",
        "volume",
        "fs",
        "fuse",
        "luks",
    },  # CVM init: the volume list at boot
    "cli": {
        "errors",
        "sealfs",
        "meter",
        "strict",
        "crypto",
        "store",
        "tarstream",
        "sealed",
        "attest",
        "kms",
        "volume",
        "fs",
        "check",
        "migrate",
        "fuse",
        "luks",
        "init",
    },
    "__main__": {"cli"},
}

#: Who may import `cryptography`, and which parts of it. DCAP verifies Intel's public X.509
#: chains and ECDSA signatures over attestation evidence: public data, no secret keys.
CRYPTOGRAPHY_USERS: dict[str, tuple[str, ...]] = {
    "sealfs/crypto.py": ("cryptography",),
    "sealfs/attest/dcap.py": (
        "cryptography.x509",
        "cryptography.exceptions",
        "cryptography.hazmat.primitives.hashes",
        "cryptography.hazmat.primitives.asymmetric.ec",
        "cryptography.hazmat.primitives.asymmetric.utils",
        "cryptography.hazmat.primitives.serialization",
    ),
}

#: Where raw key bytes (``Secret.reveal()``) may be taken out of a Secret besides crypto.py:
#: only where a secret leaves the process, and why.
REVEAL_USERS: dict[str, str] = {
    "sealfs/crypto.py": "all cryptography",
    "sealfs/cli/mount.py": "hands the credential to the mount daemon on its stdin",
    "sealfs/volume/header.py": "writes a new key file",
    "sealfs/luks/cryptsetup.py": "hands a passphrase to cryptsetup on its stdin",
    "sealfs/luks/keys.py": "turns a released key into the LUKS passphrase text",
}

#: Ending the process, or choosing its exit code, belongs to sealfs/cli only.
EXIT_NAMES = {"exit", "_exit", "exit_code", "SystemExit"}


@dataclass(frozen=True)
class Import:
    file: str  # "sealfs/fs/core.py"
    target: str  # the imported module, absolute: "sealfs.volume.anchor"
    line: int


def _files() -> list[Path]:
    return sorted(SEALFS.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(SEALFS.parent).as_posix()


def _package(path: Path) -> list[str]:
    parts = list(path.relative_to(SEALFS.parent).with_suffix("").parts)
    return parts if path.name == "__init__.py" else parts[:-1]


def _is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module rather than a name in one (outside sealfs, assume a
    module: ``from cryptography import x509`` imports ``cryptography.x509``)."""
    if component(dotted) is None:
        return True
    base = SEALFS.parent.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path) -> Iterator[Import]:
    """Every import in ``path`` (lazy and TYPE_CHECKING ones too: they are arrows as well),
    resolved to the modules it names: ``from sealfs import strict`` is that module,
    ``from sealfs.errors import UsageError`` is ``sealfs.errors``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(_rel(path), alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(path)[: len(_package(path)) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                yield Import(_rel(path), sub if _is_module(sub) else module, node.lineno)


def component(module: str) -> str | None:
    """``sealfs.fs.core`` -> ``fs``; ``sealfs`` -> ``sealfs``; outside sealfs -> None."""
    parts = module.split(".")
    if parts[0] != "sealfs":
        return None
    return parts[1] if len(parts) > 1 else "sealfs"


def _own_component(file: str) -> str:
    """``sealfs/fs/core.py`` -> ``fs``; ``sealfs/__init__.py`` -> ``sealfs``."""
    return component(".".join(Path(file).with_suffix("").parts).removesuffix(".__init__")) or ""


def all_imports() -> list[Import]:
    return [imp for path in _files() for imp in imports(path)]


def test_the_table_is_a_stack() -> None:
    """Each row names only rows above it: the allowed arrows cannot form a cycle."""
    seen: set[str] = set()
    for name, allowed in LAYERS.items():
        assert allowed <= seen, f"{name} may import {sorted(allowed - seen)}, not above it"
        seen.add(name)
    found = {_own_component(_rel(p)) for p in _files()}
    assert found == set(LAYERS), f"components not in the table: {sorted(found ^ set(LAYERS))}"


def test_the_readme_states_the_same_table() -> None:
    """README.md ("Layers") lists each package with what it may import, besides errors and
    the package version."""
    readme = (SEALFS.parent / "README.md").read_text()
    section = readme.split("### Layers", 1)[1]
    rows = re.findall(r"^\| ([a-z_]+) \|([a-z_, ]*)\|", section, re.M)
    stated = {name: set(deps.replace(",", " ").split()) for name, deps in rows if name != "package"}
    implied = {"errors", "sealfs"}
    expected = {
        name: allowed - implied
        for name, allowed in LAYERS.items()
        if name not in implied | {"__main__"}
    }
    assert stated == expected


def test_imports_point_down() -> None:
    wrong = []
    for imp in all_imports():
        ours, theirs = _own_component(imp.file), component(imp.target)
        if theirs is None or theirs == ours or theirs in LAYERS[ours]:
            continue
        wrong.append(f"{imp.file}:{imp.line}: {ours} must not import {imp.target}")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)


def test_only_crypto_uses_cryptography() -> None:
    wrong = []
    for imp in all_imports():
        if imp.target.split(".")[0] != "cryptography":
            continue
        allowed = CRYPTOGRAPHY_USERS.get(imp.file, ())
        if not any(imp.target == a or imp.target.startswith(a + ".") for a in allowed):
            wrong.append(f"{imp.file}:{imp.line}: imports {imp.target}")
    assert not wrong, "cryptography outside sealfs/crypto.py:\n" + "\n".join(wrong)


def _calls(path: Path, attr: str) -> list[int]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attr
    ]


def test_raw_key_bytes_stay_in_crypto() -> None:
    wrong = [
        f"{_rel(p)}:{line}: Secret.reveal()"
        for p in _files()
        if _rel(p) not in REVEAL_USERS
        for line in _calls(p, "reveal")
    ]
    assert not wrong, "raw key bytes outside sealfs/crypto.py:\n" + "\n".join(wrong)
    stale = [f for f in REVEAL_USERS if not _calls(SEALFS.parent / f, "reveal")]
    assert not stale, f"REVEAL_USERS lists files that no longer reveal keys: {stale}"


def test_store_knows_no_keys() -> None:
    names = {
        n.id
        for n in ast.walk(ast.parse((SEALFS / "store.py").read_text()))
        if isinstance(n, ast.Name)
    }
    assert not names & {"Secret", "VolumeKeys", "ObjectSealer", "Sealer"}


def _exit_uses(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Name) and node.id in EXIT_NAMES:
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute) and node.attr in EXIT_NAMES:
            yield node.lineno, node.attr


@pytest.mark.parametrize(
    "path", [p for p in _files() if _own_component(_rel(p)) != "cli"], ids=_rel
)
def test_only_cli_ends_the_process(path: Path) -> None:
    uses = [f"{_rel(path)}:{line}: {name}" for line, name in _exit_uses(path)]
    assert not uses, "exit codes are chosen in sealfs/cli only:\n" + "\n".join(uses)
