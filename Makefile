# Two commands: `make lab` starts the lab, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: lab test install lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# Where torch comes from. TORCH_INDEX=<a PyTorch wheel index> takes torch from there, e.g. PyTorch's
# CPU-only index on a Linux machine without a GPU (the default Linux wheel carries CUDA, several GB).
TORCH_INDEX ?=
# Jupyter refuses to start as root (containers, cloud GPU boxes) unless told: tell it only then.
ALLOW_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

# On a machine without CUDA, take the CPU build of torch first: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	@if [ -n "$(TORCH_INDEX)" ]; then \
		$(BIN)/pip install torch --index-url "$(TORCH_INDEX)"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing the default torch build"; \
	else \
		$(BIN)/pip install "torch==2.13.0"; \
	fi
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# JupyterLab listens on 127.0.0.1 only, with a token: open the http://127.0.0.1:...?token=... URL
# it prints. LAB_ARGS adds flags (e.g. LAB_ARGS="--no-browser --port 8899").
lab: install
	@echo "Starting JupyterLab on 127.0.0.1; open the URL with the token printed below."
	$(BIN)/jupyter lab --notebook-dir=notebooks --ServerApp.ip=127.0.0.1 $(ALLOW_ROOT) $(LAB_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install
	bash scripts/ensure_chromium.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest tests --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks

clean:
	rm -rf $(VENV) data/cache .pytest_cache
