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

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from triton import knobs

# Read once: the choice of kernel flavour is made when @triton.jit runs, at import.
INTERPRET: bool = bool(knobs.runtime.interpret)

# Each op's Python body by "namespace::name", and context managers entered around every
# kernel launch (given the kernel and the FLOPs of its products): what a launch census
# (bench/census.py) needs to count an op by its contents.
IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {}
LAUNCH_HOOKS: list[Callable[[Any, int], AbstractContextManager]] = []

# While planning (see `planning_gpu_launches`): the GPU path's dtypes and launch
# configurations, launches reported to LAUNCH_HOOKS but not run.
_planning = False


def planning() -> bool:
    """Whether op bodies run inside `planning_gpu_launches` now."""
    return _planning


def interpreting() -> bool:
    """Whether op bodies take the interpreter's path (dtypes, launch configurations) now."""
    return INTERPRET and not _planning


@contextmanager
def planning_gpu_launches() -> Iterator[None]:
    """Run op bodies as they run on a GPU, without launching a kernel: io dtypes and launch
    configurations of the GPU path, every launch reported to LAUNCH_HOOKS and skipped. For
    a census on fake tensors (any shape, no GPU, no memory)."""
    global _planning
    previous, _planning = _planning, True
    try:
        yield
    finally:
        _planning = previous


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

    def __init__(self, kernel: Any, flops: int) -> None:
        self.kernel, self.flops = kernel, flops

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            with ExitStack() as stack:
                for hook in LAUNCH_HOOKS:
                    stack.enter_context(hook(self.kernel, self.flops))
                if _planning:
                    return None
                return (self.kernel if INTERPRET else torch.library.wrap_triton(self.kernel))[grid](*args, **kwargs)

        return run


def launcher(kernel: Any, flops: int = 0) -> Any:
    """What `kernel[grid](...)` must be called on inside an op body; `flops`: the
    multiply-adds x 2 of the launch's products (what a census credits it with)."""
    return _Launcher(kernel, flops)


def io_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels read and write for a tensor of `dtype` (fp32 for half
    precision under the interpreter, which cannot handle bf16)."""
    if interpreting() and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def kernel_input(t: torch.Tensor) -> torch.Tensor:
    """`t` as the kernels read it: contiguous, in io_dtype."""
    return t.to(io_dtype(t.dtype)).contiguous()
