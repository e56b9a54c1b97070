# Two commands matter: `make demo` and `make test`. Each creates .venv on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Users who want a CUDA build override this, e.g. `make TORCH_SPEC=torch demo`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,examples,plots,tensorboard,mlflow,wandb,compat

.PHONY: demo test lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[$(EXTRAS)]"
	touch $@

# `make demo` trains the VAE; `make demo CONFIGS=all` (or a list of .toml files) runs others.
CONFIGS ?=
demo: $(VENV)/.installed
	$(PY) examples/demo.py $(CONFIGS)

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The suite measures pythae, Ignite and Lightning only where they are installed (not by default).
bench: $(VENV)/.installed
	$(PY) benchmarks/overhead.py
	mkdir -p runs && $(PY) benchmarks/suite.py --output runs/bench-report.md

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .hypothesis
