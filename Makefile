# `make demo` and `make test` work on a fresh clone: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# `make demo` installs the package alone; `make test` adds the extras the tests, benchmarks and docs need.
DEMO_STAMP := $(VENV)/.demo-stamp
STAMP := $(VENV)/.installed-stamp

# Real ImageNet weights that sit beside the project (see ../shared/weights/SOURCES.md).
SHARED_WEIGHTS := $(abspath ../shared/weights)
ifneq ($(wildcard $(SHARED_WEIGHTS)),)
export CNNCODES_WEIGHTS_DIR ?= $(SHARED_WEIGHTS)
endif

.PHONY: install test typecheck docs-site suite test-fast demo bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP): pyproject.toml $(DEMO_STAMP)
	$(PY) -m pip install --quiet -e '.[test,ray,serve,bench,docs]'
	touch $@

# Lint first (a second); then the type check and the docs build run beside the suite, in the time its
# tests spend waiting on servers and child processes. Any failure fails `make test`.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts
	$(MAKE) --no-print-directory -j 3 typecheck docs-site suite

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Not -q: with it MkDocs 1.6 drops warnings before --strict counts them (mkdocs/mkdocs#4126).
docs-site: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d build/site

# Two processes, each taking whole test files: a file's shared fixtures (its models, the one local Ray,
# the one server) are made once; the suite is sized for two cores.
suite: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# The tests only, without those marked slow (Keras training, over 10 s each): a minute or two while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

demo: $(DEMO_STAMP)
	$(VENV)/bin/cnncodes demo

bench: $(STAMP)
	$(PY) scripts/bench_extract.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
