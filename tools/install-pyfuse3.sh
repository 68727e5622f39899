#!/usr/bin/env bash
# Install pyfuse3 into the given interpreter's environment, built from source against the
# system libfuse3 (needs libfuse3-dev and pkg-config).
set -euo pipefail
PY=${1:-python3}
"$PY" -m pip install -q 'pyfuse3>=3.3'
