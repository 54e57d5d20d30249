# The two commands of the README:  make demo   (the main job)   and   make test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FLOWKERN_DATA ?= $(abspath ../shared/data/sts)
export FLOWKERN_DATA

.PHONY: setup demo test bench

CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

# pip install -e . also compiles the extension flowkern._C from csrc/ (the "cpp" backend; about 2 minutes on 2 cores).
$(BIN)/.installed: requirements/cpu.txt setup.py $(CSRC)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements/cpu.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/flowkern demo --out-dir flowkern-demo

# FLOWKERN_REQUIRE_EXTENSION: a failed extension build fails the tests instead of skipping the "cpp" ones.
test: setup
	FLOWKERN_REQUIRE_EXTENSION=1 $(BIN)/python -m pytest tests -q

bench: setup
	$(BIN)/python -m pytest bench -q --benchmark-only
