# One command runs the farm (make run), one passes the tests (make test). Both set up .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
# Test files run this many at a time (pytest-xdist, a file per process): most of the suite waits
# on the worker and web processes it starts, not on the CPU. TEST_JOBS=0 runs them one by one.
# The tests marked serial change what every test shares (the local RabbitMQ node): they run
# after the others, alone.
TEST_JOBS ?= 3

.PHONY: run test test-fast lint venv clean bench bench-web bench-history bench-fair-share bench-previews \
	bench-watchers

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Prefer a torch 2.13.0 wheel already on this machine (pip's find-links); else keep what
	# is installed or let pip pick one, so GPU users keep their own CUDA build.
	if $(PIP) install --dry-run --no-index --no-deps torch==2.13.0 >/dev/null 2>&1; then \
		$(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[web,worker,test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/svdfarm up --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile -m "not serial" $(PYTEST_ARGS)
	$(PY) -m pytest -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: none selected

# The tests that start no worker process, server or browser: `make test` less the slow ones.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -m "not slow and not browser and not full_shape" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The benchmarks (bench/), side by side on this machine; they rewrite docs/BENCHMARKS.md.
# They need PostgreSQL and Redis: started here when local and down, else the target fails.
bench: $(STAMP)
	$(PY) -m bench.services
	$(PY) -m bench.farm_overhead --write
	$(PY) -m bench.farm_overhead --write --all-cores --epochs 4
	$(PY) -m bench.queue_latency --write
	$(PY) -m bench.web_load --write
	$(PY) -m bench.watchers --write
	$(PY) -m bench.model_cache --write
	$(PY) -m bench.profile_farm --write
	$(PY) -m bench.store_load --write
	$(PY) -m bench.history --write

# The web benchmark alone (bench/web_load.py: wrk when installed), with the same services.
bench-web: $(STAMP)
	$(PY) -m bench.services
	$(PY) -m bench.web_load --write

# 1,000 live watchers (server-sent events) of running jobs: each step's delivery latency and
# the web's CPU (bench/watchers.py), with the same services.
bench-watchers: $(STAMP)
	$(PY) -m bench.services
	$(PY) -m bench.watchers --write

# Fair share between two owners on one worker, and submit -> start on an idle farm
# (bench/fair_share.py), with the same services.
bench-fair-share: $(STAMP)
	$(PY) -m bench.services
	$(PY) -m bench.fair_share --write

# What the denoising previews cost (bench/previews.py): tiny renders in process, SVD-XT's shape.
bench-previews: $(STAMP)
	$(PY) -m bench.previews --write

# Every page and background pass at 1,000,000 jobs against an empty database (about 10 min).
bench-history: $(STAMP)
	$(PY) -m bench.services
	$(PY) -m bench.history --write

clean:
	rm -rf $(VENV) var .pytest_cache
