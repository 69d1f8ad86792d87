# The two commands: `make lab` (bring up the local multi-node lab) and `make test` (run every test).
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python

.PHONY: setup lab lab-down test lint bench
setup:
	@bash scripts/setup.sh

# `make lab`: a 2-node lab (agents, embedded API server, world) with the demo app of examples/echo.yaml;
# it keeps running until `make lab-down`. LAB_NODES=N for another size.
LAB_NODES ?= 2
lab: setup
	$(VENV)/bin/pycilium lab up --nodes $(LAB_NODES)
	$(VENV)/bin/pycilium lab apply -f examples/echo.yaml --wait
	@$(VENV)/bin/pycilium lab status
	@echo
	@vip=$$($(VENV)/bin/pycilium lab status -o json | $(PY) -c 'import json, sys; \
	  print(next(s["clusterIP"] for s in json.load(sys.stdin)["services"] if s["name"] == "echo"))'); \
	echo "try:  $(VENV)/bin/pycilium lab probe --from demo/client --to $$vip:80 --count 4"
	@echo "      $(VENV)/bin/pycilium lab probe --from world --to 192.168.200.11:30080        # NodePort"
	@echo "      $(VENV)/bin/pycilium lab probe --from demo/client --to 192.168.200.100:8080  # masqueraded"
	@echo "      $(VENV)/bin/pycilium lab exec node1 -- pycilium bpf ct list global"
	@echo "remove it: make lab-down"

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
