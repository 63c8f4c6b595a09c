# qsweep: `make demo` sets up a venv and runs the default quick-start sweep; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; pip would otherwise pull a multi-GB CUDA build on a machine without a GPU.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint ui clean services services-stop

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/qsweep run -m +sweep=quickstart
	@echo
	@echo "Review the runs:  $(BIN)/qsweep ui    (or: $(BIN)/mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db)"

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts

ui: setup
	$(BIN)/qsweep ui

# The shared store on loopback: PostgreSQL (Debian's package) and `mlflow server` on it (README "Scaling out").
services: setup
	PYTHON=$(BIN)/python scripts/services.sh start

services-stop:
	PYTHON=$(BIN)/python scripts/services.sh stop

clean:
	rm -rf outputs/* multirun
