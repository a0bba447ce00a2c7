"""Builds jsa_fast._C, the C++ (and, once csrc/ holds .cu files, CUDA) extension.

Project metadata lives in pyproject.toml; this file only describes the extension.

- CUDA build (CUDAExtension from csrc/*.cpp and csrc/*.cu) when csrc/ holds a .cu file,
  torch was built with CUDA and a CUDA toolkit root is found, for every recent GPU:
  TORCH_CUDA_ARCH_LIST defaults to DEFAULT_ARCH_LIST (Ampere sm_80, Hopper sm_90,
  Blackwell sm_100, and PTX of sm_100 that newer GPUs compile when they load it); set
  TORCH_CUDA_ARCH_LIST to build for others.
- CPU build (CppExtension from csrc/*.cpp) otherwise, or when JSA_FAST_FORCE_CPU=1.

Install with `pip install -e . --no-build-isolation` (the build needs the torch it runs
against).
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCH_LIST = "8.0;9.0;10.0+PTX"


def find_cuda_toolkit() -> Path | None:
    """The root of a CUDA toolkit (holding bin/nvcc and include/cuda_runtime.h), or None.

    torch's own guess takes the parent of the nvcc found on PATH, which is wrong where
    that nvcc is a wrapper script (as on our machines): every candidate must hold the
    toolkit's headers too, so a wrapper's folder is passed over for the real root.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path is not None:
        candidates.append(str(Path(nvcc_on_path).resolve().parent.parent))
    candidates += [f"/usr/local/cuda-{torch.version.cuda}", "/usr/local/cuda"]
    for candidate in filter(None, candidates):
        root = Path(candidate)
        if (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file():
            return root
    return None


def nvidia_wheel_include_dirs() -> list[str]:
    """Headers of the nvidia-* wheels (cuSPARSE, cuBLAS, ...) that torch's CUDA headers include."""
    try:
        import nvidia
    except ImportError:
        return []
    return [str(Path(p) / "cu13" / "include") for p in nvidia.__path__ if (Path(p) / "cu13" / "include").is_dir()]


def openmp_flags() -> list[str]:
    """-fopenmp where ATen uses OpenMP: at::parallel_for is a header template whose
    pragmas only parallelise when the extension itself is compiled with OpenMP."""
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        return ["-fopenmp"]
    return []


def make_extension() -> Extension:
    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    force_cpu = os.environ.get("JSA_FAST_FORCE_CPU", "0") == "1"
    toolkit = None if force_cpu or not cuda_sources or torch.version.cuda is None else find_cuda_toolkit()
    if cuda_sources and toolkit is None and not force_cpu:
        warnings.warn(
            f"csrc/ holds CUDA sources but torch has CUDA {torch.version.cuda} and no CUDA toolkit was "
            "found (set CUDA_HOME): building the CPU-only extension",
            stacklevel=2,
        )
    cxx_flags = ["-O3", "-std=c++17", *openmp_flags()]

    if toolkit is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is first imported.
        os.environ["CUDA_HOME"] = str(toolkit)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        from torch.utils.cpp_extension import CUDAExtension

        return CUDAExtension(
            "jsa_fast._C",
            cpp_sources + cuda_sources,
            include_dirs=nvidia_wheel_include_dirs(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=openmp_flags(),
        )

    from torch.utils.cpp_extension import CppExtension

    return CppExtension(
        "jsa_fast._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=openmp_flags(),
    )


def main() -> None:
    extension = make_extension()  # first: it may set CUDA_HOME for cpp_extension
    from torch.utils.cpp_extension import BuildExtension

    setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})


if __name__ == "__main__":
    main()
