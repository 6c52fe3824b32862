# flawmap developer commands. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.flawmap-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch is pinned first so that the editable install finds it satisfied and pulls no CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[torch,export,runtime,serve,report,dev,weights,batch,ray,faiss]"
	touch $(STAMP)

demo: setup
	$(BIN)/flawmap demo

test: setup
	$(BIN)/python -m pytest -q --durations=25

bench: setup
	$(BIN)/python benchmarks/bench_methods.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
