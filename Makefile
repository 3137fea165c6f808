# Two commands do everything on a fresh clone: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: serve test lint clean redis-server chromium conformance

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,loadtest]'
	touch $@

# Tests start their own redis-server processes: install it if absent.
redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# Browser tests drive Debian's Chromium headless (never a downloaded browser): install it if absent.
chromium:
	@command -v chromium >/dev/null || { \
	  echo "installing chromium (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# OpenReplay's real tracker and assist plugin (npm releases pinned in tests/openreplay/package.json),
# bundled by esbuild into one browser script for the drop-in tests; built when missing or its pins change.
OPENREPLAY_BUNDLE := tests/openreplay/dist/openreplay.js

$(OPENREPLAY_BUNDLE): tests/openreplay/package.json tests/openreplay/package-lock.json tests/openreplay/entry.js
	@command -v npm >/dev/null || { \
	  echo "installing nodejs and npm (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
	cd tests/openreplay && npm ci --no-audit --no-fund --loglevel=error && npm run --silent bundle

serve: $(VENV)/.installed
	$(VENV)/bin/hub serve $(ARGS)

test: $(VENV)/.dev redis-server chromium $(OPENREPLAY_BUNDLE)
	$(PY) -m pytest $(PYTEST_ARGS)

# WebSocket conformance (BENCHMARKS.md): Autobahn|Testsuite's fuzzingclient against the hub's
# transport. It runs on Python 2.7 only (pyenv's, or PYTHON2=...), installed once into the venv;
# not part of `make test`.
PYTHON2 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/2.7*/bin/python2.7) python2.7)
AUTOBAHN := $(VENV)/autobahn

$(AUTOBAHN)/.installed:
	$(PYTHON2) -m pip install -q --target $(AUTOBAHN) autobahntestsuite==25.10.1
	touch $@

conformance: $(VENV)/.dev $(AUTOBAHN)/.installed
	$(PY) -m tests.autobahn --python2 $(PYTHON2) --autobahn $(AUTOBAHN)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check hub tests loadtest
	$(VENV)/bin/ruff format --check hub tests loadtest
	$(VENV)/bin/mypy hub

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache tests/openreplay/node_modules tests/openreplay/dist
