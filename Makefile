# Every target creates .venv and installs torch==2.13.0 (CPU build) before the project,
# so no dependency can pull an unpinned (CUDA) torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-quick lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,hf]"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/autocompress run experiments/digits_mlp.yaml --run-dir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The long suites that back promises (driver kill/resume matrix, memory, disk full, the report in
# Chromium): `-m slow`
# replaces the default `-m 'not slow'`; -rfE names every failure and error in the summary.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -rfE

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/bench.py --quick

lint: $(STAMP)
	$(BIN)/ruff check autocompress tests benchmarks experiments
	$(BIN)/ruff format --check autocompress tests benchmarks experiments

format: $(STAMP)
	$(BIN)/ruff format autocompress tests benchmarks experiments
	$(BIN)/ruff check --fix autocompress tests benchmarks experiments

clean:
	rm -rf $(VENV) runs .pytest_cache
