# featstudy: one command per job. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install featstudy with its test extra

demo: $(STAMP)  ## the whole pipeline on the offline demo data (digits, random VGG19 weights, tagged)
	$(PY) -m featstudy experiment=demo

test: $(STAMP)  ## the full test suite (CPU only, < 15 min on 2 cores)
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## the suite without slow end-to-end tests
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)  ## benchmarks (ratios against a baseline measured in the same run)
	$(PY) bench/ks.py

clean:  ## remove build artefacts (keeps .venv, mlruns/ and outputs/)
	rm -rf build dist src/*.egg-info .pytest_cache .hypothesis
