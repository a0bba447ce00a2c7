# One-command entry points; each creates .venv, installs the pinned packages and builds
# the extension first when needed (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jsa-fast-installed
DALI_STAMP := $(VENV)/.jsa-fast-dali
PYTEST_ARGS ?=

.PHONY: setup demo test test-all clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation -e .
	# DALI (the GPU data path) is optional: installed where there is a CUDA GPU.
	if nvidia-smi -L >/dev/null 2>&1; then $(PY) -m pip install --quiet -r requirements-dali.txt; fi
	touch $(STAMP)

# The tests also run DALI's CPU operators, so the test setup always installs it.
$(DALI_STAMP): requirements-dali.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-dali.txt
	touch $(DALI_STAMP)

# Train the tiny preset on the bundled synthetic world, then evaluate it.
demo: $(STAMP)
	$(PY) -m jsa_fast.train --out runs/demo
	$(PY) -m jsa_fast.evaluate --checkpoint runs/demo/last.pt --out runs/demo/eval

# The default suite (CI runs this); slow tests are deselected in pyproject.toml.
test: $(STAMP) $(DALI_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP) $(DALI_STAMP)
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info jsa_fast/_C*.so
