# Two entry points: `make run` (the default COMP-AMS experiment via `flwr run .`) and `make test`.
# Both create .venv on first use (about 3 minutes: torch is large) and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	bash scripts/run_local.sh

test: $(STAMP)
	$(VENV)/bin/pytest -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_core.py
