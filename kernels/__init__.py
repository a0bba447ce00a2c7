"""Triton kernels of jsa-fast, one file per fused op, each registered as a PyTorch
operator (namespace `jsa`) with a hand-written backward.

- `slot_attention` (kernels/slot_attention.py): logits, softmax over slots, + eps, key
  normalisation and the context Â^T LN(x), forward and backward.
- `gru_gates` (kernels/gru.py): the GRUCell gate nonlinearities and blend.

How they are registered (triton_op on a GPU, custom_op under TRITON_INTERPRET=1):
kernels/registry.py. Kernels never import training code; each is tested against
`jsa_fast.reference`.
"""

from kernels.gru import gru_gates
from kernels.registry import INTERPRET
from kernels.slot_attention import slot_attention

__all__ = ["INTERPRET", "gru_gates", "slot_attention"]
