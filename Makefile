# Two entry points: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck proto bench-core

setup: $(STAMP)

# torch==2.13.0 resolves to the local CPU build on the development and CI machines;
# installing it first keeps pip from ever pulling a CUDA build through the extras.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/kvservice demo

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy

# Unit and kernel tests run in their own pytest process: their guard fails any test that
# finds Ray running, and the integration tests keep one local Ray up for their session.
test: setup lint typecheck
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/unit tests/kernels
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/integration

proto: setup
	$(PY) -m kvservice.protogen

bench-core: setup
	$(PY) -m benchmarks.core
