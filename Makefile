# Two commands on a fresh clone:
#   make quickstart   set up .venv, prepare the default corpus, train, evaluate, generate
#   make test         set up .venv, run the test suite
#
# TORCH picks the PyTorch build installed before distllm. The default is the CPU build;
# on a GPU machine use e.g. `make quickstart TORCH=torch` (the CUDA build from PyPI).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
CONFIG ?= configs/debug.yaml
RUN    ?= runs/debug
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup quickstart test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/distllm prepare $(CONFIG)
	$(BIN)/distllm train $(CONFIG)
	$(BIN)/distllm eval $(RUN)
	$(BIN)/distllm plot $(RUN)
	$(BIN)/distllm generate $(RUN) --prompt "def " --max-new-tokens 120

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train_step.py

clean:
	rm -rf runs data
