# Everything runs in .venv; torch is pinned because an unpinned one pulls several GB of CUDA wheels.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

.PHONY: install test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[train,serve,dev]"
	touch $@

test: install
	$(BIN)/ruff check diffad tests
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check diffad tests

clean:
	rm -rf $(VENV) build *.egg-info
