# One command each on a fresh machine: `make demo`, `make test`. Both set up .venv first when needed.
# TORCH_SPEC picks the torch build, e.g. `make setup TORCH_SPEC=torch==2.13.0` (a CPU build) or a CUDA wheel.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch
SAMPLE_DATA ?= data/sample
SAMPLE_EVAL ?= data/sample_eval

.PHONY: setup demo test test-slow test-shared bench lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

$(SAMPLE_DATA): | setup
	$(VENV)/bin/granite-docling sample-data $(SAMPLE_DATA) --pages 24 --formulas 48 --seed 0

$(SAMPLE_EVAL): | setup
	$(VENV)/bin/granite-docling sample-data $(SAMPLE_EVAL) --pages 6 --formulas 12 --seed 1

# Tiny model, generated sample data, CPU, a few minutes; ends with an evaluation report on held-out samples.
demo: setup $(SAMPLE_DATA) $(SAMPLE_EVAL)
	$(PY) train.py experiment=demo dataset.sample.path=$(SAMPLE_DATA) hydra.run.dir=outputs/demo
	$(PY) evaluate.py checkpoint=outputs/demo/final_model dataset=[sample] dataset.sample.path=$(SAMPLE_EVAL) \
		eval.split=all hydra.run.dir=outputs/demo/eval

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# Checks the vendored processor files against IBM's originals in ../shared (not part of `make test`).
test-shared: setup
	$(PY) -m pytest -q -m shared

bench: setup
	$(PY) benchmarks/run_all.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
