# ticketguard developer commands. Every target sets up its own virtual environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out

.PHONY: setup test test-all demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

demo: setup
	bash scripts/demo.sh $(DEMO_DIR)

bench: setup
	$(BIN)/python benchmarks/run.py

lint: setup
	$(BIN)/ruff check ticketguard tests benchmarks
	$(BIN)/ruff format --check ticketguard tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench-out .pytest_cache .ruff_cache
