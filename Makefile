# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv from the repo's files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt $(wildcard integrations/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]" $(foreach d,$(wildcard integrations/*/pyproject.toml),-e $(dir $(d)))
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/minirerank demo

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/engine.py

clean:
	rm -rf $(VENV) .pytest_cache
