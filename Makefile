# keepbits: two commands for a new machine with Python 3.11.
#   make demo   - create .venv, install keepbits, run the main job on the bundled default
#   make test   - install (with test tools), build the native library, run the test suite,
#                 then check the device install (no torch) in a second virtual environment
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.keepbits-installed
RUNTIME_VENV ?= .venv-runtime

.PHONY: demo test test-runtime install native clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel (an unpinned torch pulls several GB of CUDA packages)
	$(BIN)/python -m pip install -q torch==2.13.0

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/keepbits demo

native: install
	bash native/build.sh --optional

test: install native
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(MAKE) test-runtime

# the device install: `pip install .` with no extras must run the demo and decode its payloads without torch
test-runtime:
	bash .ci/runtime-only $(PYTHON) $(RUNTIME_VENV)

clean:
	rm -rf $(VENV) $(RUNTIME_VENV) native/build build *.egg-info
