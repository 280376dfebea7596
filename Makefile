# Two commands for a newcomer: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BEANIE1 := .venv/beanie1
DEMO := .venv/demo
PY := $(VENV)/bin/python
PY1 := $(BEANIE1)/bin/python
PYDEMO := $(DEMO)/bin/python
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: demo demo-dashboard test test-beanie2 test-beanie1 check lint docs bench clean

# Beanie 2 on PyMongo's async client: the primary stack.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev,server,bench]'
	touch $@

# Beanie 1.x on Motor, with mongomock-motor as the in-process backend.
$(BEANIE1)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BEANIE1)
	$(PY1) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY1) -m pip install $(PIP_FLAGS) -e '.[dev,server,motor]' 'beanie>=1.26,<2' 'mongomock-motor>=0.0.34'
	touch $@

# Only what the demo needs (the library and the embedded server): no test, lint, docs or bench tools.
$(DEMO)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO)
	$(PYDEMO) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PYDEMO) -m pip install $(PIP_FLAGS) -e '.[demo]'
	touch $@

demo: $(DEMO)/.installed
	$(PYDEMO) -m beanie_tasks.demo

# The demo again, then its data in the web dashboard (adds the `web` extra to the demo's venv).
$(DEMO)/.web-installed: $(DEMO)/.installed
	$(PYDEMO) -m pip install $(PIP_FLAGS) -e '.[demo,web]'
	touch $@

demo-dashboard: $(DEMO)/.web-installed
	$(PYDEMO) -m beanie_tasks.demo --dashboard

# Both environments install side by side (mostly network and disk), then the checks and suites run in turn.
test:
	$(MAKE) -j2 $(VENV)/.installed $(BEANIE1)/.installed
	$(MAKE) check test-beanie2 test-beanie1

test-beanie2: $(VENV)/.installed
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

# The slow soak and volume runs exercise the queue, not the driver: they run on the Beanie 2 stack only.
test-beanie1: $(BEANIE1)/.installed
	@echo "Beanie 1 + Motor: every test except those marked slow (soak, volume, multi-process runs), which run on Beanie 2"
	$(PY1) -m pytest -q -rs -m "not slow" $(PYTEST_ARGS)

check: $(VENV)/.installed
	$(VENV)/bin/ruff check beanie_tasks tests bench
	$(VENV)/bin/ruff format --check beanie_tasks tests bench
	$(VENV)/bin/mypy

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix beanie_tasks tests bench
	$(VENV)/bin/ruff format beanie_tasks tests bench

docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict

# Benchmarks (not tests): under 10 minutes on 2 cores; `make bench BENCH_ARGS=--quick` for a short run.
bench: $(VENV)/.installed
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache
