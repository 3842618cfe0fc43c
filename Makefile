# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shardwise-installed
# The CPU build of torch where no GPU is present: a bare `torch` requirement may pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing torch $(TORCH_VERSION)"; \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	else \
		echo "No GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	fi
	$(PY) -m pip install --quiet -e ".[dev,triton]"
	@touch $(STAMP)

demo: setup
	$(PY) -m shardwise.cli.main demo

# The suite runs in TEST_JOBS processes (pytest-xdist; `make test TEST_JOBS=0` runs it in one): most of its time is
# single-threaded Python (tracing, planning, solving), so one process leaves the second of the two cores the
# suite's 20-minute budget is set for mostly idle. Whole modules go to each process (--dist loadfile), so a
# module's fixtures and the session's worker pools are made once per process, not once per test.
TEST_JOBS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
