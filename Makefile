# The two commands of the README: `make run` (the main job on the built-in corpus) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup run test test-all lint

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m jaxspeech.demo --workdir $(WORKDIR)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

test-all: lint
	$(PY) -m pytest -q -m "slow or not slow"
