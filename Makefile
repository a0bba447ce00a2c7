# One-command entry points; each creates .venv, installs the pinned packages and builds
# the extension first when needed (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jsa-fast-installed
DALI_STAMP := $(VENV)/.jsa-fast-dali
PYTEST_ARGS ?=

.PHONY: setup demo lint test test-all test-gpu bench-gpu clean

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

# Train the tiny preset on the bundled synthetic world, then evaluate it (a new demo
# replaces the last one: --overwrite).
demo: $(STAMP)
	$(PY) -m jsa_fast.train --out runs/demo --overwrite
	$(PY) -m jsa_fast.evaluate --checkpoint runs/demo/last.pt --out runs/demo/eval

# ruff's lint and format checks (settings in pyproject.toml); `make test` runs them first.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The default suite after lint (CI runs this); slow tests are deselected in pyproject.toml.
test: lint $(DALI_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP) $(DALI_STAMP)
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

# On a GPU machine: the GPU-marked tests, then every benchmark at the issues' sizes
# (JSON to bench/results/). bench/slot_attn.py runs each of its ~32 variants in a process of
# its own (8 of them max-autotune compiles): the longest; the others take a few minutes.
test-gpu: $(STAMP) $(DALI_STAMP)
	$(PY) -m pytest -m gpu -ra $(PYTEST_ARGS)

bench-gpu: $(STAMP) $(DALI_STAMP)
	$(PY) bench/slot_attn.py
	$(PY) bench/kreciprocal.py --device cuda
	$(PY) bench/train_step.py --device cuda --preset paper --batch-size 256 --steps 20
	$(PY) bench/loader.py --device cuda --n 20000 --batch 256 --batches 20

clean:
	rm -rf build *.egg-info jsa_fast/_C*.so
