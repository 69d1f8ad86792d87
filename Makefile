# The two commands: `make lab` (bring up the local multi-node lab) and `make test` (run every test).
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
NODES ?= 2

.PHONY: setup lab lab-down test lint bench
setup:
	@bash scripts/setup.sh

lab: setup
	$(VENV)/bin/pycilium lab up --nodes $(NODES)

lab-down: setup
	$(VENV)/bin/pycilium lab down

test: setup lint
	$(PY) -m pytest -ra $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m bench.run_all
