# The two commands: `make run` starts the whole app, `make test` runs the suite.
# Both bootstrap a virtualenv with the machine's Python and start PostgreSQL and Redis
# from their pip wheels, with generated passwords: `make run` under var/ unless
# DATABASE_URL / REDIS_URL are set, and restarts whatever crashes (docs/operations.md);
# `make test` in a throwaway directory, and refuses DATABASE_URL / REDIS_URL (it flushes
# Redis): set TEST_DATABASE_URL / TEST_REDIS_URL to test against external servers.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test browser promptfoo lint bench clean

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

run: $(VENV)/.installed
	@$(PY) -m project.stack run

test: $(VENV)/.installed browser promptfoo
	@$(PY) -m project.stack test -- $(ARGS)

# The browser tests drive Debian's chromium (Playwright's own browser download is not used).
# Install it where it is missing and apt-get is there; without it those tests fail in CI and
# are skipped on a developer machine that has no apt.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@if [ ! -x $(CHROMIUM) ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing chromium with apt-get for the browser tests..."; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium >/dev/null || echo "Could not install chromium; browser tests will not run."; \
	fi

# The real promptfoo checks what `export_cards --format promptfoo` writes (tests/test_promptfoo.py).
# promptfoo 0.123 needs Node 22, which npm's `node` package brings; both go under var/node,
# once. Without npm that test fails in CI and is skipped on a developer machine.
PROMPTFOO_VERSION := 0.123.1
PROMPTFOO_NODE_VERSION := 22.23.3
PROMPTFOO_DIR := var/node
promptfoo:
	@if grep -qs '"version": "$(PROMPTFOO_VERSION)"' $(PROMPTFOO_DIR)/node_modules/promptfoo/package.json \
		&& [ -x $(PROMPTFOO_DIR)/node_modules/.bin/node ]; then :; \
	elif command -v npm >/dev/null 2>&1; then \
		echo "Installing promptfoo $(PROMPTFOO_VERSION) into $(PROMPTFOO_DIR) for the promptfoo tests..."; \
		mkdir -p $(PROMPTFOO_DIR) && npm install --prefix $(PROMPTFOO_DIR) --no-audit --no-fund \
			--loglevel=error promptfoo@$(PROMPTFOO_VERSION) node@$(PROMPTFOO_NODE_VERSION) >/dev/null \
			|| echo "Could not install promptfoo; the promptfoo tests will fail in CI."; \
	else echo "npm not found; the promptfoo tests will fail in CI."; fi

bench: $(VENV)/.installed
	@$(PY) -m project.stack exec -- $(PY) bench/engine_bench.py

# Style, formatting and the architecture contract (the import layers in pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) var test-output
