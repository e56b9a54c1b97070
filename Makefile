# Two commands matter: `make demo` and `make test`. Each creates .venv on a fresh machine and
# installs only what it needs: the demo its extras (scikit-learn's digits, matplotlib for the
# plots), the tests everything they import (pytest and the linters, the trackers, pythae).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Users who want a CUDA build override this, e.g. `make TORCH_SPEC=torch demo`.
TORCH_SPEC ?= torch==2.13.0
DEMO_EXTRAS ?= examples,plots
TEST_EXTRAS ?= dev,examples,plots,tensorboard,mlflow,wandb,compat
EXTRAS_demo = $(DEMO_EXTRAS)
EXTRAS_test = $(TEST_EXTRAS)

.PHONY: demo test lint typecheck bench clean mutation-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per set of extras (.installed-demo, .installed-test): `make test` after `make demo`
# adds what the tests need on top.
$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[$(EXTRAS_$*)]"
	touch $@

# `make demo` trains the VAE; `make demo CONFIGS=all` (or a list of .toml files) runs others.
CONFIGS ?=
demo: $(VENV)/.installed-demo
	$(PY) examples/demo.py $(CONFIGS)

test: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Breaks each guarantee in a scratch copy and checks its tests fail (slow; not part of `make test`).
mutation-check: $(VENV)/.installed-test
	$(PY) tests/mutations.py

# The suite measures pythae, Ignite and Lightning only where they are installed (not by default).
bench: $(VENV)/.installed-test
	$(PY) benchmarks/overhead.py
	mkdir -p runs && $(PY) benchmarks/suite.py --output runs/bench-report.md

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .hypothesis
