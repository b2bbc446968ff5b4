# Two entry points, each working on a fresh clone:
#   make demo   install into .venv and run the main job
#   make test   install into .venv, lint, and run the whole test suite
# The CPU build of torch is pinned; on a machine with a GPU pass e.g.
#   make test TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo demo-results test lint format bench install clean

$(STAMP): setup.py requirements/test.txt requirements/peers.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -r requirements/test.txt
	$(PY) -m pip install --quiet --no-deps -r requirements/peers.txt  # peer code, without its CUDA torch
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Train and evaluate a tiny COTS (runs/demo/), then the kernel report.
demo: $(STAMP)
	$(PY) -m cots.demo
	$(PY) -m benchmarks.report

# COTS_TEST_STRICT turns "extension not built" / "Triton missing" skips into failures.
test: $(STAMP) lint
	COTS_TEST_STRICT=1 $(PY) -m pytest -q tests

# ruff's lint rules and formatter (configured in pyproject.toml); `make format` applies them.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The demo run the README quotes: benchmarks/results/demo_cpu.json and demo_cpu.png.
demo-results: $(STAMP)
	$(PY) -m cots.demo --out runs/demo
	cp runs/demo/summary.json benchmarks/results/demo_cpu.json
	cp runs/demo/demo.png benchmarks/results/demo_cpu.png

# One pytest-benchmark JSON per op suite: benchmarks/results/cpu_<op>.json.
bench: $(STAMP)
	for suite in benchmarks/test_*_cpu.py; do \
	  op=$${suite#benchmarks/test_}; op=$${op%_cpu.py}; \
	  $(PY) -m pytest -q $$suite --benchmark-only --benchmark-json=benchmarks/results/cpu_$$op.json || exit 1; \
	done

clean:
	rm -rf $(VENV) build *.egg-info cots_kernels/_C*.so
