# Everything runs in .venv; torch is pinned because an unpinned one pulls several GB of CUDA wheels.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

.PHONY: install test lint clean deploy-tools deploy-check demo demo-clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[train,serve,triton,dev]"
	# tests/test_triton.py runs the tritonserver binary that this wheel carries (Linux x86-64, glibc 2.35+).
	# --no-deps: only the binary is used; the wheel's Python package would pin numpy<2.
	$(BIN)/pip install --quiet --no-deps nvidia-pytriton==0.7.0 || echo "nvidia-pytriton cannot be installed here: tests/test_triton.py will skip its Triton tests"
	touch $@

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

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

# --- demo: a working model on a CPU in a few minutes, then the service -----------------------------
# First run: a synthetic woven-texture category (the project's own generator), the small preset trained
# for DEMO_STEPS seeded steps (not minutes, so a slow machine gets the same model, later), evaluated (which
# calibrates the threshold) and exported. Every step is a file target, so a second `make demo` serves at
# once; `make demo-clean` starts over.
PORT ?= 8000
# 127.0.0.1, as the service itself defaults: `HOST=0.0.0.0 make demo` lets other machines reach it.
HOST ?= 127.0.0.1
# 600 steps on whole 64 px images: the 100-step 128 px model of before found the defects by chance (its map
# was dark on them), this one finds every test defect (README, Quick start), at the cost of 100 such steps.
DEMO_STEPS ?= 600
DEMO_SIZE ?= 64
DEMO_DATA := runs/demo-data
DEMO_RUN := runs/demo
DEMO_BUNDLE := bundles/demo

demo: $(DEMO_BUNDLE)/bundle.json
	@echo
	@echo "demo: serving $(DEMO_BUNDLE) on $(HOST):$(PORT) (Ctrl-C stops it). When the log below says the"
	@echo "  model is ready (after its warm-up), or GET /readyz answers 200:"
	@echo "  web page:  http://localhost:$(PORT)/"
	@echo "  try it:    curl -F file=@$(DEMO_DATA)/sample_defect.png 'http://localhost:$(PORT)/inspect?map=none'"
	@echo "             curl -F file=@$(DEMO_DATA)/sample_good.png 'http://localhost:$(PORT)/inspect?map=none'"
	@echo
	$(BIN)/diffad serve $(DEMO_BUNDLE) --host $(HOST) --port $(PORT)

$(DEMO_DATA)/sample_defect.png: | $(VENV)/.installed
	@echo "demo: 1/4 generating a synthetic category in $(DEMO_DATA)"
	rm -rf $(DEMO_DATA)
	$(BIN)/python -m diffad.training.demo_data $(DEMO_DATA)/weave --samples $(DEMO_DATA) --num-validation 32

$(DEMO_RUN)/calibration.json: $(DEMO_DATA)/sample_defect.png
	@echo "demo: 2/4 training the small preset at $(DEMO_SIZE) px for $(DEMO_STEPS) steps (3-6 minutes on 2 cores)"
	rm -rf $(DEMO_RUN)
	$(BIN)/diffad train $(DEMO_DATA)/weave --out $(DEMO_RUN) --preset small --image-size $(DEMO_SIZE) --crop 0 \
		--max-steps $(DEMO_STEPS)
	@echo "demo: 3/4 evaluating on the category's test set (calibrates the threshold)"
	$(BIN)/diffad evaluate $(DEMO_RUN) $(DEMO_DATA)/weave --json $(DEMO_RUN)/eval.json

$(DEMO_BUNDLE)/bundle.json: $(DEMO_RUN)/calibration.json
	@echo "demo: 4/4 exporting the bundle $(DEMO_BUNDLE)"
	$(BIN)/diffad export $(DEMO_RUN) --out $(DEMO_BUNDLE) --overwrite --no-fp16-graph

demo-clean:
	rm -rf $(DEMO_DATA) $(DEMO_RUN) $(DEMO_BUNDLE)
