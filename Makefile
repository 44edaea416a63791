# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv from the repo's files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo lint test bench train clean

$(STAMP): pyproject.toml constraints.txt $(wildcard integrations/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]" $(foreach d,$(wildcard integrations/*/pyproject.toml),-e $(dir $(d)))
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/minirerank demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	OMP_NUM_THREADS=2 $(PY) -m pytest -q  # tests/ and each integration package's tests/ (pyproject testpaths)

bench: $(STAMP)
	$(PY) benchmarks/engine.py

# The shipped default models' recipe (MODEL_CARD.md), every stage resumable; about an hour on 2 CPU cores.
RUN ?= runs/defaults
train: $(STAMP)
	$(PY) -m minirerank_core.train.recipe --out $(RUN) --threads 1

clean:
	rm -rf $(VENV) .pytest_cache
