# mHC TileLang kernel suite. `make` sets up and builds every kernel (for the local GPU, else cross-compiled for
# sm_90a) with a report; `make test` runs the test suite. See README.md.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# Installed only when no torch is importable: the torch already present (CPU or CUDA build) is always kept.
TORCH_SPEC ?= torch
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_ARGS ?=
# make bench BENCH_ARGS=--quick (or --n-sweep 2 6 8, --no-compile, ...; see python -m profiling --help)
BENCH_ARGS ?=
STAMP := build/.installed

.PHONY: all install kernels test test-gpu bench bench-compare lint format clean

all: kernels

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "no torch found: installing $(TORCH_SPEC)"; $(PIP) install "$(TORCH_SPEC)"; }
	$(PIP) install -e ".[dev]"
	@mkdir -p build && touch $(STAMP)

install: $(STAMP)

kernels: install
	$(PYTHON) -m tl_kernels.build --jobs $(JOBS) --json build/kernels.json

test: install
	$(PYTHON) -m pytest -n $(JOBS) $(PYTEST_ARGS)

test-gpu: install
	$(PYTHON) -m pytest -m gpu $(PYTEST_ARGS)

bench: install
	$(PYTHON) -m profiling bench $(BENCH_ARGS)

bench-compare: install
	$(PYTHON) -m profiling compare $(BENCH_ARGS)

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

clean:
	rm -rf build .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
