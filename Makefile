# mHC TileLang kernel suite. `make` sets up and builds every kernel (for the local GPU, else cross-compiled for
# sm_90a) with a report; `make test` runs the test suite. See README.md.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# Extra arguments for every pip install (an index, a proxy, --no-cache-dir, ...).
PIP_ARGS ?=
# Installed only when no torch is importable: the torch already present (CPU or CUDA build) is always kept.
# Split into words, so it may carry pip options. Default: the CPU build from PyTorch's index on a machine without
# nvidia-smi (about 200 MB), the default (CUDA) build from PyPI otherwise (several GB). Override, e.g.
#   make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"   or   make TORCH_SPEC=/path/to/torch.whl
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch --index-url $(TORCH_CPU_INDEX))
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_ARGS ?=
# make bench BENCH_ARGS=--quick (or --n-sweep 2 6 8, --no-compile, ...; see python -m profiling --help)
BENCH_ARGS ?=
STAMP := build/.installed

.PHONY: all install kernels test test-gpu bench bench-compare lint format clean

all: kernels

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import sys; sys.exit(sys.prefix == sys.base_prefix and 'CONDA_PREFIX' not in __import__('os').environ)" 2>/dev/null \
		|| echo "note: not in a virtual environment; packages go into $$($(PYTHON) -c 'import sys; print(sys.prefix)') (README: python3 -m venv .venv && . .venv/bin/activate)"
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "no torch found: pip install $(TORCH_SPEC) $(PIP_ARGS)"; $(PIP) install $(TORCH_SPEC) $(PIP_ARGS); }
	$(PIP) install -e ".[dev]" $(PIP_ARGS)
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
