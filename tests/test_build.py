"""The extension's build: setup.py compiles the CUDA kernels for every recent GPU."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The nvcc architecture flags torch's BuildExtension passes for setup.py's extension, by
# default and with TORCH_CUDA_ARCH_LIST set: one line each.
ARCH_FLAGS = """
import importlib.util, os, sys
from pathlib import Path
from torch.utils.cpp_extension import _get_cuda_arch_flags
sys.argv = ["setup.py"]
spec = importlib.util.spec_from_file_location("setup_module", Path("setup.py"))
setup_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_module)
for arch_list in (None, "8.6"):
    if arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    extension = setup_module.make_extension()
    print(any(source.endswith(".cu") for source in extension.sources), *_get_cuda_arch_flags())
"""


@pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="needs a CUDA toolkit (nvcc)"
)
def test_cuda_extension_builds_for_ampere_hopper_blackwell_and_ptx():
    # What a CUDA build gets, whatever this shell asks for (JSA_FAST_FORCE_CPU builds the twin).
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "JSA_FAST_FORCE_CPU")}
    result = subprocess.run(
        [sys.executable, "-c", ARCH_FLAGS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    default, override = (line.split() for line in result.stdout.splitlines()[-2:])
    assert default[0] == "True" and set(default[1:]) == {
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_100,code=sm_100",
        "-gencode=arch=compute_100,code=compute_100",  # PTX: newer GPUs compile it when loading
    }
    assert override == ["True", "-gencode=arch=compute_86,code=sm_86"]  # TORCH_CUDA_ARCH_LIST overrides the default
