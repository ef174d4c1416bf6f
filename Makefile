# The two commands of the README work alone on a fresh machine: each creates .venv and
# installs mmpipe on first use, and again whenever pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo ui test lint format bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@# img2dataset pulls the `dataclasses` backport, which shadows the standard library
	@# module and breaks Prefect's server ("dataclass() got an unexpected keyword argument 'slots'").
	$(BIN)/pip uninstall --quiet -y dataclasses
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmpipe demo

ui: $(STAMP)
	$(BIN)/mmpipe server start

test: $(STAMP) lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/crawl.py

# One H100/H200-class GPU: attention, CLIP, DALL-E ZeRO-3 and dVAE-code figures in <= 8 min.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) state .pytest_cache
