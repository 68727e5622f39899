#!/usr/bin/env bash
# Install pyfuse3 3.5.0 into the environment of the given interpreter, built from the PyPI sdist
# with the patches in tools/pyfuse3-patches/ applied (in name order), against the system libfuse3
# (needs libfuse3-dev, pkg-config and a C compiler). Cython and the other build dependencies are
# fetched by pip into an isolated build env. Does nothing if the installed pyfuse3 is already
# patched (has Operations.fallocate and FileInfo.noflush, the newest patch).
#
# usage: tools/install-pyfuse3.sh /path/to/python
set -euo pipefail

PY=${1:?usage: $0 /path/to/python}
VERSION=3.5.0
PATCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/pyfuse3-patches

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore

is_patched() {
    "$PY" - "$VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
import pyfuse3
patched = hasattr(pyfuse3.Operations, 'fallocate') and hasattr(pyfuse3.FileInfo(), 'noflush')
sys.exit(0 if version('pyfuse3') == sys.argv[1] and patched else 1)
EOF
}

if is_patched; then
    echo "pyfuse3 $VERSION (patched) already installed"
    exit 0
fi

shopt -s nullglob
patches=("$PATCH_DIR"/*.patch)
((${#patches[@]})) || { echo "error: no patches in $PATCH_DIR" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "building patched pyfuse3 $VERSION (${#patches[@]} patch(es))"
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "pyfuse3==$VERSION"
tar -xzf "$tmp/pyfuse3-$VERSION.tar.gz" -C "$tmp"
src=$tmp/pyfuse3-$VERSION

# Apply each patch strictly (no fuzz, no offset); any mismatch aborts. Done in Python rather than
# with patch(1), which a fresh Debian install does not necessarily have.
"$PY" - "$src" "${patches[@]}" <<'EOF'
import pathlib, re, sys

root = pathlib.Path(sys.argv[1])
for patch in sys.argv[2:]:
    lines = pathlib.Path(patch).read_text('utf-8').splitlines()
    nfiles, i = 0, 0
    while i < len(lines) - 1:
        if not (lines[i].startswith('--- ') and lines[i + 1].startswith('+++ ')):
            i += 1
            continue
        new_name = lines[i + 1][4:].split('\t')[0]
        if new_name == '/dev/null':
            sys.exit(f'error: {patch}: file deletion is not supported')
        name = new_name.split('/', 1)[1]  # -p1
        path = root / name
        text = path.read_text('utf-8').splitlines() if path.exists() else []
        out, pos, i = [], 0, i + 2
        while i < len(lines) and lines[i].startswith('@@ '):
            m = re.match(r'@@ -(\d+)(?:,(\d+))? \+\d+(?:,(\d+))? @@', lines[i])
            old_start, old_n, new_n = int(m[1]), int(m[2] or 1), int(m[3] or 1)
            start = old_start if old_n == 0 else old_start - 1
            old, new, i = [], [], i + 1
            while len(old) < old_n or len(new) < new_n:
                line = lines[i] if i < len(lines) else '\\'
                tag, body = line[:1] or ' ', line[1:]
                if tag not in ' -+':
                    sys.exit(f'error: {patch}: malformed hunk near line {i + 1}')
                if tag != '+':
                    old.append(body)
                if tag != '-':
                    new.append(body)
                i += 1
            if start < pos or text[start:start + old_n] != old:
                sys.exit(f'error: {patch}: hunk at {name}:{old_start} does not apply')
            out += text[pos:start] + new
            pos = start + old_n
        if i < len(lines) and lines[i].startswith('\\'):
            sys.exit(f'error: {patch}: "no newline at end of file" is not supported')
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('\n'.join(out + text[pos:]) + '\n', 'utf-8')
        nfiles += 1
    if not nfiles:
        sys.exit(f'error: {patch}: no file changes found')
EOF

# Drop the pre-generated C file so the build re-runs Cython on the patched .pyx/.pxi sources.
rm -f "$src/src/pyfuse3/__init__.c"

"$PY" -m pip install -q --no-cache-dir "$src"

is_patched || { echo "error: pyfuse3 installed but its patches are missing" >&2; exit 1; }
echo "pyfuse3 $VERSION (patched) installed"
