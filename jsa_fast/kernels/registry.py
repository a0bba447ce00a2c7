"""How the Triton kernels become PyTorch operators, on a GPU and under the interpreter.

On a GPU an op is a `torch.library.triton_op` whose body launches its kernels through
`torch.library.wrap_triton`, so torch.compile sees the kernels themselves. Under
TRITON_INTERPRET=1 (no GPU) `triton_op`/`wrap_triton` fail, so the op is an opaque
`torch.library.custom_op` with a registered fake instead; the interpreter also cannot
load or store bf16, so half-precision buffers are widened to fp32 around the kernels
there. Either way the op passes `torch.compile(fullgraph=True)` and
`torch.library.opcheck`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
from triton import knobs

# Read once: the choice of kernel flavour is made when @triton.jit runs, at import.
INTERPRET: bool = bool(knobs.runtime.interpret)

# Each op's Python body by "namespace::name", and context managers entered around every
# kernel launch (given the kernel): what a launch census (bench/census.py) needs to count
# an op by its contents.
IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {}
LAUNCH_HOOKS: list[Callable[[Any], AbstractContextManager]] = []


def register_op(name: str, fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: make `fn` the operator `name` (namespace::op) with fake `fake`.

    `fake` must compute output metadata only; `triton_op` derives its own from `fn`.
    """

    def wrap(fn: Callable[..., Any]) -> Any:
        IMPLEMENTATIONS[name] = fn
        if INTERPRET:
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, fn, mutates_args=())

    return wrap


class _Launcher:
    """`kernel[grid](...)` through wrap_triton on a GPU, telling LAUNCH_HOOKS first."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        launch = (self.kernel if INTERPRET else torch.library.wrap_triton(self.kernel))[grid]

        def run(*args: Any, **kwargs: Any) -> Any:
            with ExitStack() as stack:
                for hook in LAUNCH_HOOKS:
                    stack.enter_context(hook(self.kernel))
                return launch(*args, **kwargs)

        return run


def launcher(kernel: Any) -> Any:
    """What `kernel[grid](...)` must be called on inside an op body."""
    return _Launcher(kernel)


def io_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels read and write for a tensor of `dtype` (fp32 for half
    precision under the interpreter, which cannot handle bf16)."""
    if INTERPRET and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def kernel_input(t: torch.Tensor) -> torch.Tensor:
    """`t` as the kernels read it: contiguous, in io_dtype."""
    return t.to(io_dtype(t.dtype)).contiguous()
