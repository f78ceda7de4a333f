# One command runs the farm (make run), one passes the tests (make test). Both set up .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Prefer a torch 2.13.0 wheel already on this machine (pip's find-links); else keep what
	# is installed or let pip pick one, so GPU users keep their own CUDA build.
	if $(PIP) install --dry-run --no-index --no-deps torch==2.13.0 >/dev/null 2>&1; then \
		$(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/svdfarm up --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var .pytest_cache
