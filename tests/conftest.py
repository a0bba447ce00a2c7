"""Test-session setup shared by every test module.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched
on before any @triton.jit function is defined: pytest imports this file before the test
modules, and so before `jsa_fast` (which imports `kernels`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
