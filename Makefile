# The two commands: `make lab` (bring up the local multi-node lab) and `make test` (run every test).
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python

.PHONY: setup lab lab-down test lint bench
setup:
	@bash scripts/setup.sh

# Until the multi-node lab with agents lands, `make lab` brings up the one-node datapath lab.
lab: setup
	$(PY) -m pycilium.lab.singlenode up

lab-down: setup
	$(PY) -m pycilium.lab.singlenode down

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
