# The two commands of the README:  make demo   (the main job)   and   make test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FLOWKERN_DATA ?= $(abspath ../shared/data/sts)
export FLOWKERN_DATA

.PHONY: setup demo test bench

$(BIN)/.installed: requirements/cpu.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements/cpu.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/flowkern demo --out-dir flowkern-demo

test: setup
	$(BIN)/python -m pytest tests -q

bench: setup
	$(BIN)/python -m pytest bench -q --benchmark-only
