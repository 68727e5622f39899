"""`sealfs migrate` progress as a user meets it: on a terminal, standard error carries a
progress line (redrawn with carriage returns, ended with a newline); when standard error is
not a terminal, or with --json, it carries none; and with `export -` the progress never mixes
with the bundle stream on standard output. The terminal is a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import threading
from pathlib import Path

from tests.conftest import REPO, SEALFS, Volume, new_volume, sealfs


def on_terminal(
    *args: str, stdin: bytes | None = None, stdout_too: bool = False
) -> tuple[int, bytes, str]:
    """Run sealfs with standard error (and, ``stdout_too``, standard output) on a
    pseudo-terminal: (exit code, what standard output got, what the terminal got)."""
    master, slave = pty.openpty()
    seen: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            seen.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        proc = subprocess.Popen(
            [*SEALFS, *args],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=slave if stdout_too else subprocess.PIPE,
            stderr=slave,
            cwd=REPO,
        )
        os.close(slave)
        out, _ = proc.communicate(stdin, timeout=120)
    finally:
        reader.join(timeout=120)
        os.close(master)
    return proc.returncode, out, b"".join(seen).decode()


def progress_lines(terminal: str) -> list[str]:
    """The progress states drawn (each redraw starts with a carriage return)."""
    return [part.split("\r\n")[0] for part in terminal.split("\r")[1:] if "ETA" in part]


def key(vol: Volume) -> list[str]:
    return ["--key-file", str(vol.key)]


def test_progress_on_a_terminal_and_never_otherwise(tmp_path: Path) -> None:
    vol = new_volume(tmp_path)
    bundle, new = tmp_path / "bundle", tmp_path / "new"
    code, out, term = on_terminal(
        "migrate", "export", str(vol.backing), str(bundle), "--final", *key(vol)
    )
    assert code == 0, term
    drawn = progress_lines(term)
    assert drawn and drawn[-1].startswith("final pass: 100.0%"), term
    assert "objects" in drawn[-1] and "/s" in drawn[-1]
    assert b"\r" not in out and b"ETA" not in out  # the result on stdout stays clean
    assert term.endswith("ETA --:--\r\n")  # the last state, then the line is ended

    code, out, term = on_terminal("migrate", "import", str(bundle), str(new), *key(vol))
    assert code == 0, term
    last = progress_lines(term)[-1]
    total = json.loads((bundle / "sealfs-migrate.manifest").read_text())["manifest"]["files"]
    size = sum(f[1] for f in total)
    assert last.startswith("copying: 100.0%") and f"{size} B / {size} B" in last, term
    assert f"{len(total)}/{len(total)} objects" in last

    # the result printed after the progress starts on a line of its own
    code, _, term = on_terminal(
        "migrate",
        "import",
        str(bundle),
        str(tmp_path / "dry"),
        "--dry-run",
        *key(vol),
        stdout_too=True,
    )
    assert code == 0 and term.split("\r\n")[-2].startswith("verified volume"), term

    # --json: nothing but the JSON, even on a terminal
    code, out, term = on_terminal(
        "migrate", "import", str(bundle), str(tmp_path / "new2"), "--json", *key(vol)
    )
    assert code == 0 and json.loads(out)["ok"] and "ETA" not in term, term

    # standard error not a terminal: no progress
    res = sealfs("migrate", "import", str(bundle), str(tmp_path / "new3"), *key(vol))
    assert "\r" not in res.stderr and "ETA" not in res.stderr and res.stderr == ""


def test_stream_export_keeps_progress_off_the_stream(tmp_path: Path) -> None:
    vol = new_volume(tmp_path)
    code, stream, term = on_terminal("migrate", "export", str(vol.backing), "-", *key(vol))
    assert code == 0, term
    phases = [line.split(":")[0] for line in progress_lines(term)]
    assert "hashing" in phases and "sending" in phases, term
    assert "fork" in term.strip().splitlines()[-1]  # the summary follows the progress
    code, out, term = on_terminal(
        "migrate", "import", "-", str(tmp_path / "new"), *key(vol), stdin=stream
    )
    assert code == 0, term  # the stream was not corrupted by progress output
    assert progress_lines(term)[-1].startswith("receiving: 100.0%"), term


def test_a_refused_import_ends_the_progress_line_before_its_error(tmp_path: Path) -> None:
    vol = new_volume(tmp_path)
    bundle = tmp_path / "bundle"
    sealfs("migrate", "export", str(vol.backing), str(bundle), "--final", *key(vol))
    journal = next(bundle.glob("journal.*"))
    journal.write_bytes(journal.read_bytes() + b"x")  # longer than its manifest entry
    code, _, term = on_terminal("migrate", "import", str(bundle), str(tmp_path / "n"), *key(vol))
    assert code == 5 and progress_lines(term)[0].startswith("copying:"), term
    assert term.splitlines()[-1].startswith("sealfs: error:"), term
