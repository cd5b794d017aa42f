# Every target installs what it needs: `make test` and `make demo` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast lint demo bench clean gpu-kit gpu-kit-test

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PY) -m pip install -q uv
	@test -x $(BIN)/python || uv venv -q --python $(PY) $(VENV)
	uv pip install -q --python $(BIN)/python -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Every benchmark script in benchmarks/ (quick mode where offered), then benchmarks/results/SUMMARY.md.
bench: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build runs .pytest_cache

demo: setup
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

# The GPU run kit (docs/gpu-serving.md): wheels + redis-server for the device machine in .gpu_kit/ ...
gpu-kit:
	bash scripts/gpu/prepare.sh

# ... and its plumbing test here (this venv's Python: the carried wheels are for the device's CPython 3.12).
gpu-kit-test: setup gpu-kit
	PYTHON=$(BIN)/python KIT_INSTALL=0 OUT=$${OUT:-/tmp/e2vpt-gpu-out} bash scripts/gpu/run.sh
