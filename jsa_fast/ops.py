"""Custom ops of jsa_fast._C, with PyTorch fallbacks.

k_reciprocal_mask runs the extension's kernel for the tensors' device when it has one (CPU
always; CUDA when the extension was built with nvcc) and
`jsa_fast.reference.k_reciprocal_mask` otherwise (warning once per process when
jsa_fast._C is absent or fails to load, e.g. built against another torch). The kernels
give the reference's mask bit for bit wherever the similarities are exact in float32 (ties
included); they sum dot products in float64, so two similarities within a float32 rounding
of each other may be ordered differently from the reference's float32 matrix product
(csrc/k_reciprocal.h), as two float32 summation orders may.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from jsa_fast import reference
from jsa_fast.reference import pack_mask, unpack_mask

__all__ = ["k_reciprocal_mask", "extension_available", "pack_mask", "unpack_mask"]

_OP_NAME = "jsa_fast::k_reciprocal_mask"


def _extension_error() -> str | None:
    """None when jsa_fast._C loads and has the op this module calls, else why not."""
    try:
        import jsa_fast._C  # noqa: F401  (loading the library registers torch.ops.jsa_fast.*)
    except (ImportError, OSError) as error:
        # Absent (a checkout not built, a platform without a compiler) or unloadable (built
        # against another torch: undefined symbols).
        return " ".join(str(error).split()) or type(error).__name__
    arguments = [argument.name for argument in torch.ops.jsa_fast.k_reciprocal_mask.default._schema.arguments]
    if "check_finite" not in arguments:
        # Built from older sources (an editable install not rebuilt): every call would fail.
        return f"built from older sources, its op takes ({', '.join(arguments)})"
    return None


# Where the extension is not usable the PyTorch reference path serves, and the first call
# that takes it says so (`_warn_fallback_once`).
_EXTENSION_ERROR = _extension_error()
# Looked up once here, not per call: torch.compile can trace a set lookup but not the
# dispatcher query.
_KERNEL_DEVICE_TYPES = frozenset(
    device_type
    for device_type, dispatch_key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if _EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, dispatch_key)
)

if _EXTENSION_ERROR is None:

    @torch.library.register_fake(_OP_NAME)
    def _k_reciprocal_mask_fake(
        z_img: Tensor, z_aud: Tensor, k: int, packed: bool = False, check_finite: bool = True
    ) -> Tensor:
        batch = z_img.shape[0]
        if packed:
            return z_img.new_empty((batch, (batch + 31) // 32), dtype=torch.int32)
        return z_img.new_empty((batch, batch), dtype=torch.bool)


_fallback_warned = False


def _warn_fallback_once() -> None:
    """One RuntimeWarning per process, on the first call that takes the reference path
    because jsa_fast._C is not usable (never while torch.compile traces: a warning there
    would break the graph)."""
    global _fallback_warned
    if _fallback_warned or torch.compiler.is_compiling():
        return
    _fallback_warned = True
    warnings.warn(
        f"jsa_fast._C is not usable ({_EXTENSION_ERROR}): k_reciprocal_mask runs the PyTorch reference "
        "path instead (slower). Build the extension against the installed torch: "
        "`pip install --no-build-isolation .` (or `-e .`) in a jsa-fast checkout (docs/build.md).",
        RuntimeWarning,
        stacklevel=3,
    )


def extension_available(device: torch.device | str) -> bool:
    """Whether jsa_fast._C imported and has a k_reciprocal_mask kernel for `device`."""
    return torch.device(device).type in _KERNEL_DEVICE_TYPES


def k_reciprocal_mask(
    z_img: Tensor, z_aud: Tensor, k: int = 20, *, packed: bool = False, check_finite: bool = True
) -> Tensor:
    """Predicted false negatives R (paper eq. 12-13), as in docs/model.md.

    z_img, z_aud: B x D float (fp32, fp64, bf16, fp16; rows are L2-normalised inside)
    -> B x B bool, diagonal False. R[i, j] says that j is among the k rows nearest to i
    and i among the k nearest to j, by cosine similarity of both the image and the audio
    rows (self included, ties to the lower index). Raises ValueError, naming the argument
    and what was seen, for k < 1, k > B, mismatched shapes or devices, non-float input,
    or (check_finite=True) non-finite input.

    check_finite=False skips the finiteness check, which reads a flag back to the host (a
    device sync on CUDA; a graph break on the reference path under torch.compile): a row
    holding a value that is not finite then counts as a zero row (similarity 0 to every
    row). For callers that detect non-finite values downstream, as training does through
    its loss.

    packed=True returns B x ceil(B / 32) int32 words instead (`pack_mask`'s layout, bit b
    of word w of row i is R[i, 32 w + b]; `unpack_mask` expands it): the form for large
    global batches, 512 MiB instead of 4 GiB at B = 65,536. The kernels never hold more
    than a tile of the B x B similarity (a bounded scratch), O(B k) neighbour lists and
    O(B D) copies of the rows (csrc/k_reciprocal.h). Rows whose similarities crowd
    together (collapsed embeddings) take a general path of about the cost of spread ones.
    Small B (up to the device's kDirectMaxBatch, csrc/k_reciprocal_cpu.cpp and
    csrc/k_reciprocal_cuda.cu) takes a direct path, every row's exact similarities to all
    rows and its k nearest: the same mask without the filter's fixed costs, and without
    reading anything back to the host when check_finite is False (docs/api.md, "Paths").
    """
    # The one validation of the arguments: metadata only, so no device sync, and compiled
    # graphs run it too. Finiteness needs the values: the C++ op checks it where it casts
    # the rows to float32 (and repeats the metadata checks for direct torch.ops callers),
    # the reference in `mutual_neighbour_mask`.
    reference.check_k_reciprocal_inputs(z_img, z_aud, k)
    for name, flag in (("packed", packed), ("check_finite", check_finite)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    if extension_available(z_img.device):
        return torch.ops.jsa_fast.k_reciprocal_mask(z_img, z_aud, k, packed, check_finite)
    if _EXTENSION_ERROR is not None:
        _warn_fallback_once()
    mask = reference.mutual_neighbour_mask(z_img, z_aud, k, check_finite=check_finite)
    return pack_mask(mask) if packed else mask
