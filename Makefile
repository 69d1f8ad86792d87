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

# mypy sees the pycilium namespace through a symlink tree (setup.py maps the folders the same way).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@mkdir -p build/typecheck/pycilium
	@for p in agent:agent bpf:bpf cli:cli cni:cni-plugin lab:lab; do \
	  ln -sfn ../../../$${p#*:} build/typecheck/pycilium/$${p%%:*}; done
	cd build/typecheck && MYPYPATH=. $(VENV)/bin/mypy --config-file ../../pyproject.toml -p pycilium

bench: setup
	$(PY) -m bench.run_all
