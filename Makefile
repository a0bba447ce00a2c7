# One-command entry points; each creates .venv, installs the pinned packages and builds
# the extension first when needed (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jsa-fast-installed
DALI_STAMP := $(VENV)/.jsa-fast-dali
PYTEST_ARGS ?=

.PHONY: setup demo lint test test-numeric-default test-wheel test-compat test-all test-gpu bench-gpu clean

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

# The tests that compare numbers (marked numeric: kernels and ops against the reference,
# 1 against 2 processes, resumes) once more on ATen's portable kernels (no AVX2/AVX-512),
# where a tolerance fitted to one instruction set fails first; CI runs it after `make test`.
# Left out to keep it to a few minutes (all run in `make test`): the k-reciprocal parities
# at B >= 300 (those at B <= 64 stay), the fused operator's runs on other layouts and GPU
# tile sizes (the fp32 parity's comparison again, which stays), its fp64 gradcheck,
# opcheck, fake-tensor trace and compile, its half-precision runs (tolerances of 1e-2 and
# more), and the Ctrl-C resume (bit-exact, as test_resume_continues_exactly, which stays).
NUMERIC_SKIPPED := \
	tests/test_k_reciprocal.py::test_kernel_matches_reference_on_exact_ties[300- \
	tests/test_k_reciprocal.py::test_kernel_matches_reference_on_random_rows[300- \
	tests/test_k_reciprocal.py::test_kernel_on_tight_clusters \
	tests/test_k_reciprocal.py::test_kernel_general_path_for_rows_with_many_candidates \
	tests/test_k_reciprocal.py::test_kernel_with_many_tiles_and_chunks \
	tests/test_k_reciprocal.py::test_kernel_large_k_takes_the_general_path \
	tests/test_k_reciprocal.py::test_kernel_matches_reference_on_collapsed_exact_rows \
	tests/test_k_reciprocal.py::test_kernel_on_collapsed_rows_without_ties \
	tests/test_k_reciprocal.py::test_kernel_on_a_batch_dominated_by_one_class \
	tests/test_k_reciprocal.py::test_kernel_skips_the_filter_after_a_crowded_first_tile \
	tests/test_fused.py::test_operator_gradcheck_fp64 \
	tests/test_fused.py::test_operator_opcheck \
	tests/test_fused.py::test_gpu_registration_traces_into_kernels_without_view_mutation \
	tests/test_fused.py::test_kernels_with_the_gpu_tiles_under_the_interpreter \
	tests/test_fused.py::test_torch_compile_fullgraph \
	tests/test_fused.py::test_fused_matches_reference_on_any_strides \
	tests/test_fused.py::test_fused_half_precision_close_to_fp32_reference \
	tests/test_train.py::test_ctrl_c_saves_and_resume_is_exact_mid_epoch

test-numeric-default: $(STAMP) $(DALI_STAMP)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -m "numeric and not slow and not gpu" \
		$(foreach test,$(NUMERIC_SKIPPED),--deselect '$(test)') $(PYTEST_ARGS)

# The package as others install it (tests/test_packaging.py, marked wheel): sdist and wheel
# built with `python -m build --no-isolation`, the wheel installed with --no-deps in a fresh
# venv that holds only the core dependencies (torch, numpy, triton and what they require,
# linked from .venv), run from outside the tree. About 4 minutes on 2 cores (the extension's
# compile); CI runs it after `make test`.
test-wheel: $(STAMP)
	$(PY) -m pytest -m wheel tests/test_packaging.py $(PYTEST_ARGS)

# The oldest versions pyproject.toml claims (requirements-compat.txt) in a venv of their own,
# with the extension built against that torch in a copy of the tree (.venv's build of
# jsa_fast/_C stays), running the tests of the core: the reference, the fused operator
# (under Triton's interpreter), the k-reciprocal op (opcheck included) and torch.compile.
# About 7 minutes on 2 cores with pip's cache warm, 10 on a fresh machine (torch's CUDA
# wheels to download, 7.3 GB of venv); CI runs it last (docs/build.md).
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.jsa-fast-installed
COMPAT_EXTENSION := $(COMPAT_VENV)/.jsa-fast-extension
COMPAT_TESTS := tests/test_reference.py tests/test_fused.py tests/test_k_reciprocal.py tests/test_compile.py
# The working tree as git sees it (tracked and untracked files, ignored ones left out).
COPY_TREE = rm -rf $(1) && mkdir -p $(1) && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(1)

$(COMPAT_STAMP): requirements-compat.txt
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade "pip>=24"
	$(COMPAT_PY) -m pip install --quiet -r requirements-compat.txt
	touch $(COMPAT_STAMP)

# CPU-only (JSA_FAST_FORCE_CPU=1): these torch builds are for another CUDA than a toolkit
# that may be installed here, and the tests run on the CPU.
$(COMPAT_EXTENSION): $(COMPAT_STAMP) setup.py $(wildcard csrc/*)
	$(call COPY_TREE,$(COMPAT_VENV)/build-tree)
	cd $(COMPAT_VENV)/build-tree && JSA_FAST_FORCE_CPU=1 ../bin/python setup.py --quiet build_ext --inplace
	cp $(COMPAT_VENV)/build-tree/jsa_fast/_C*.so $(COMPAT_VENV)/
	touch $(COMPAT_EXTENSION)

test-compat: $(COMPAT_EXTENSION)
	$(call COPY_TREE,$(COMPAT_VENV)/tree)
	rm -f $(COMPAT_VENV)/tree/jsa_fast/_C*.so && cp $(COMPAT_VENV)/_C*.so $(COMPAT_VENV)/tree/jsa_fast/
	cd $(COMPAT_VENV)/tree && ../bin/python -m pytest -p no:cacheprovider $(COMPAT_TESTS) $(PYTEST_ARGS)

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
	$(PY) bench/kreciprocal.py --device cuda --paths --unchecked --batch 256 512 1024 2048 4096
	$(PY) bench/train_step.py --device cuda --preset paper --batch-size 256 --steps 20
	$(PY) bench/train_loop.py --device cuda --preset paper --batch-size 256 --amp bf16 --variants released cudagraphs
	$(PY) bench/loader.py --device cuda --n 20000 --batch 256 --batches 20

clean:
	rm -rf build dist *.egg-info jsa_fast/_C*.so

# Mutation testing (issue #24, tools/mutants.py): every single-point mutant of
# jsa_fast/metrics.py, maps.py, losses.py and the reference's losses and k-reciprocal mask,
# each run against its own test files (-x, with a timeout) from a temporary copy of the
# package; prints a table per file and the survivors, and writes
# bench/results/mutants-<UTC>.json. About 10 minutes on 2 cores; not in CI.
# MUTANTS_ARGS: e.g. "--files jsa_fast/maps.py --limit 20", "--jobs 2".
MUTANTS_ARGS ?=
.PHONY: mutants
mutants: $(STAMP)
	$(PY) tools/mutants.py $(MUTANTS_ARGS)
