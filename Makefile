# featstudy: one command per job. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean help tracking-server tracking-server-stop bench-tracking mutation

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

mutation: $(STAMP)  ## mutation testing of the analysis layer and the report (mutmut, ~1 h on 2 cores; docs/testing.md)
	$(PY) -m pip install -q -e '.[dev]'
	rm -rf mutants
	NUMBA_THREADING_LAYER=workqueue OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 || true
	$(VENV)/bin/mutmut results

bench: $(STAMP)  ## benchmarks (ratios against a baseline measured in the same run)
	$(PY) bench/ks.py
	$(PY) bench/extract.py

tracking-server: $(STAMP)  ## PostgreSQL + `mlflow server --serve-artifacts` on 127.0.0.1:5055, passwords and MLflow login required (credentials: `scripts/tracking_server.sh env`; FEATSTUDY_TRACKING_AUTH=0: no login)
	scripts/tracking_server.sh start

tracking-server-stop:  ## stop the tracking server and its PostgreSQL
	scripts/tracking_server.sh stop

bench-tracking: $(STAMP)  ## 50 concurrent runs against the local tracking server (start it first; logs in with its stored credentials)
	eval "$$(scripts/tracking_server.sh env)" && $(PY) bench/tracking_load.py --uri http://127.0.0.1:$${MLFLOW_PORT:-5055} --runs 50

clean:  ## remove build artefacts (keeps .venv, mlruns/ and outputs/)
	rm -rf build dist src/*.egg-info .pytest_cache .hypothesis mutants
