# bulkhead — developer entry points. Everything that needs root runs `make setup` first,
# which installs what is missing (scripts/setup.sh) and is quick when nothing is.
#
#   make setup   install system packages, kernel headers, bpffs, .venv (root)
#   make test    setup, then unit + BPF + integration tests (root; what CI runs)
#   make unit    unit tests only, no root (needs an existing .venv)
#   make demo    setup, then `bulkhead demo` (root)
#   make demo-fleet setup, then `bulkhead demo --fleet`: two gateways, one policy through etcd (root)
#   make demo-fabric setup, then `bulkhead demo --fabric`: a flow across two gateways, by DNS, with its identity (root)
#   make bench   setup (+ the bench packages: haproxy, wrk), then the benchmarks (root)
#   make lint    byte-compile everything, plus ruff if it is installed
#   make clean   remove .venv and caches (never touches the system)
#   make vm-test the tests on Debian 12's stock kernel in a qemu VM (root; image cached in /var/cache/bulkhead-vm)
#   make install install the agent as the systemd service bulkhead (root; POLICY=my.yaml, docs/operations.md)
#   make uninstall remove the service and everything install put on the host (stops enforcing)
#
# Knobs: PYTEST_ARGS="-k foo -x", PYTEST_TIMEOUT=300 (seconds per test), BENCH_ARGS=...

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    := .venv
PY      := $(VENV)/bin/python
PYTEST_TIMEOUT ?= 300
PYTEST_ARGS    ?=
BENCH_ARGS     ?=
# Only directories that exist: git does not keep empty ones.
TEST_DIRS := $(wildcard tests/unit tests/bpf tests/integration)

.PHONY: help setup test unit demo demo-fleet demo-fabric bench lint clean

help:
	@sed -n 's/^#   make /  make /p' $(firstword $(MAKEFILE_LIST))

setup:
	bash scripts/setup.sh

# pytest exit codes: 0 ok, 1 failures, 5 no tests collected (a failure for us too).
# If PYTEST_EXIT_FILE is set, pytest's own exit code is written there (.ci/run reads it).
test: setup
	@rc=0; $(PY) -m pytest -ra --timeout=$(PYTEST_TIMEOUT) $(TEST_DIRS) $(PYTEST_ARGS) || rc=$$?; \
	if [ -n "$(PYTEST_EXIT_FILE)" ]; then echo $$rc > "$(PYTEST_EXIT_FILE)"; fi; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): that is a failure"; fi; \
	exit $$rc

unit:
	@test -x $(PY) || { echo "make unit: $(VENV) is missing; run 'make setup' as root first"; exit 1; }
	$(PY) -m pytest -ra --timeout=$(PYTEST_TIMEOUT) tests/unit $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/bulkhead demo

demo-fleet: setup
	$(VENV)/bin/bulkhead demo --fleet

demo-fabric: setup
	$(VENV)/bin/bulkhead demo --fabric

# Not `bench: setup`: the same setup, plus the bench-only packages (BULKHEAD_SETUP_BENCH=1).
bench:
	BULKHEAD_SETUP_BENCH=1 bash scripts/setup.sh
	@if [ ! -d benchmarks ]; then echo "make bench: no benchmarks/ directory yet; nothing to run"; exit 0; fi; \
	$(PY) -m pytest benchmarks/ --benchmark-only -ra --timeout=$(PYTEST_TIMEOUT) $(BENCH_ARGS)

lint:
	@test -x $(PY) || { echo "make lint: $(VENV) is missing; run 'make setup' as root first"; exit 1; }
	$(PY) -m compileall -q agent tests $(wildcard benchmarks)
	@if $(PY) -m ruff --version >/dev/null 2>&1; then $(PY) -m ruff check agent tests; \
	else echo "make lint: ruff not installed in $(VENV); only byte-compiled"; fi

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build dist *.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

# Debian 12's stock kernel (6.1) in qemu: builds the image once (debootstrap, cached outside
# the repo), boots it, runs the suite inside, exits with its status. See docs/testing-vm.md.
.PHONY: vm-test
vm-test:
	bash scripts/vm-test.sh

# The systemd service (scripts/service/): a venv in /opt/bulkhead, the unit, /etc/bulkhead.
# Neither needs `make setup`'s .venv; install.sh checks the system packages it needs.
POLICY ?=
.PHONY: install uninstall
install:
	bash scripts/service/install.sh $(if $(POLICY),--policy "$(POLICY)")

uninstall:
	bash scripts/service/uninstall.sh
