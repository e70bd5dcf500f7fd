# Everything runs in .venv; torch is pinned because an unpinned one pulls several GB of CUDA wheels.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

.PHONY: install test lint clean deploy-tools deploy-check

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

# Deployment checks (see deploy/README.md): promtool, shellcheck and two
# npm linters where they can be installed (apt-get as root, npm); missing ones only warn.
deploy-tools: install
	bash deploy/install-check-tools.sh

# Every deployment test with its tools required, then the cpu image's Python environment built as the
# Dockerfile builds it (no torch) and served end to end by deploy/entrypoint.sh. Needs PyPI; no Docker.
deploy-check: deploy-tools
	DIFFAD_DEPLOY_STRICT=1 $(BIN)/python -m pytest -q tests/test_deploy.py
	PYTHON=$(PYTHON) bash deploy/serving-env-check.sh

clean:
	rm -rf $(VENV) build *.egg-info
