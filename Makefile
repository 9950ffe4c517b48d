# Nephos: every set-up step lives here, so a fresh Debian machine needs only `make run` / `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install install-runtime run test test-fast lint services hypervisor clean bench faults screenshots

# What running needs (make run): the package and its dependencies, nothing for tests.
$(RUNTIME): pyproject.toml
	@.ci/system-packages.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -e .
	@touch $@

# What testing adds (make test): the development extras and Debian's chromium for the page tests.
$(STAMP): $(RUNTIME)
	@.ci/system-packages.sh --test
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

install-runtime: $(RUNTIME)
install: $(STAMP)

## make run: the embedded cloud (SQLite, in-memory bus) on http://127.0.0.1:8000 — Swagger UI at /docs
run: install-runtime
	$(BIN)/nephos up

## make services: install and start PostgreSQL and RabbitMQ when they are absent or stopped
services:
	@.ci/services.sh

## make hypervisor: libvirtd + QEMU (Debian's packages, started by hand when absent) and the test
## guest built from Debian's kernel and busybox into var/guest -- the real-hypervisor tier's host
hypervisor:
	@.ci/hypervisor.sh var/guest

## make test: lint, then the whole suite against PostgreSQL and SQLite (the invariant suite at 100
## examples; make faults runs it at 500) and the real-hypervisor tier on libvirtd + QEMU
test: install services hypervisor lint
	@set -a; [ -f .ci/test.env ] && source .ci/test.env; set +a; \
	NEPHOS_INVARIANT_EXAMPLES=$${NEPHOS_INVARIANT_EXAMPLES:-100} \
	$(BIN)/pytest -n 2 --dist loadfile --max-worker-restart=0 --durations=10 $(PYTEST_ARGS)

## make screenshots: the dashboard's pages photographed again into docs/screenshots/ (the README's);
## a test run writes them to its own directory
screenshots: install services
	@set -a; [ -f .ci/test.env ] && source .ci/test.env; set +a; \
	NEPHOS_SCREENSHOTS=docs/screenshots $(BIN)/pytest -p no:randomly tests/e2e/test_dashboard.py

## make test-fast: the edit-test loop -- SQLite and the in-memory bus only, no fuzzing, fault
## suite or browser, 20 invariant examples; needs no PostgreSQL or RabbitMQ
test-fast: install
	NEPHOS_FAST=1 NEPHOS_INVARIANT_EXAMPLES=$${NEPHOS_INVARIANT_EXAMPLES:-20} \
	$(BIN)/pytest -n 2 --dist loadfile $(PYTEST_ARGS)

## make lint: ruff (lint, and formatting as a check), the import contracts, mypy strict on all of app
lint: install
	$(BIN)/ruff check app tests migrations
	$(BIN)/ruff format --check app tests migrations bench
	$(BIN)/lint-imports
	$(BIN)/mypy app

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

## make bench: the end-to-end benchmark on PostgreSQL + RabbitMQ (N=1000 VMs; BENCH_ARGS="--n 200"),
## again with quorum queues, a short run under py-spy for the flame graphs, the EC2 workload against Nephos and moto's server (N=200;
## BENCH_EC2_ARGS="--n 500"), the scale figures over 10,000 VMs on 10 hosts (BENCH_SCALE_ARGS="--n
## 2000"), then one table of every figure (bench/summary.py)
bench: install services
	@set -a; [ -f .ci/test.env ] && source .ci/test.env; set +a; \
	$(BIN)/python bench/run.py $(BENCH_ARGS) && \
	$(BIN)/python bench/run.py --quorum $(BENCH_ARGS) && \
	$(BIN)/python bench/run.py --profile bench/profiles --n 300 && \
	$(BIN)/python bench/ec2.py $(BENCH_EC2_ARGS) && \
	$(BIN)/python bench/scale.py --profile bench/profiles $(BENCH_SCALE_ARGS) && \
	$(BIN)/python bench/summary.py

## make faults: the fault suite at full size, restarting the real RabbitMQ and PostgreSQL (run it
## alone), and the invariant suite with more examples; each prints its results
faults: install services
	@set -a; [ -f .ci/test.env ] && source .ci/test.env; set +a; \
	NEPHOS_FAULTS=full NEPHOS_FAULTS_REAL_RESTART=1 $(BIN)/pytest -s -p no:randomly tests/e2e/test_fault_suite.py && \
	NEPHOS_INVARIANT_EXAMPLES=$${NEPHOS_INVARIANT_EXAMPLES:-500} $(BIN)/pytest -s tests/logic/test_invariants.py
