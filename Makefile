# sealfs developer entry points. `make run` and `make test` each do all set-up on a fresh
# Debian machine as root: system packages, a virtualenv, then the job itself.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config cryptsetup-bin gcc python3-dev python3-venv \
	git rsync sqlite3 qemu-system-x86 busybox-static shellcheck libpq5 postgresql-15 \
	postgresql-client-15
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test test-fast vm-test lint bench clean

setup: .stamp-apt $(VENV)/.stamp

.stamp-apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing </dev/null; \
	fi
	@touch $@

$(VENV)/.stamp: pyproject.toml tools/install-pyfuse3.sh $(wildcard tools/pyfuse3-patches/*.patch)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	bash tools/install-pyfuse3.sh $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

run: setup
	$(VENV)/bin/sealfs demo

# The static checks: lint, the formatter's verdict (`ruff format sealfs tests tools` fixes it),
# and the types (mypy; its settings are in pyproject.toml).
lint: setup
	$(PY) -m ruff check sealfs tests tools
	$(PY) -m ruff format --check sealfs tests tools
	$(PY) -m mypy

# The whole suite: real FUSE mounts, cryptsetup, a KMS on 127.0.0.1 (needs root).
test: lint
	$(PY) -m pytest -q -ra tests

# The inner loop, in seconds: the static checks, the import contract (tests/unit/test_layers.py)
# and the in-process unit and core tests (no FUSE mount, no pyfuse3 import, no timing).
test-fast: lint
	$(PY) -m pytest -q -ra tests/unit tests/core

# The real boot (minutes, not in `make test`): systemd as PID 1 in a qemu VM brings the volumes
# up with sealfs-init.service, reboots, and restarts a killed FUSE daemon (docs/init.md).
vm-test: setup
	SEALFS_VM_BOOT=1 $(PY) -m pytest -q -ra tests/init/test_vm_boot.py

bench: setup
	tools/bench

clean:
	rm -rf $(VENV) .stamp-apt
