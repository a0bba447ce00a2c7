"""Triton kernels of jsa-fast and the operator they make up, each kernel's file stating
the math it computes, all tested against `jsa_fast.reference`.

- `joint_slot_attention` (jsa_fast/kernels/joint_slot_attention.py): JSA's N iterations for both
  modalities as one operator (`jsa_fast::joint_slot_attention` and its backward), on folded
  weights, from these kernels:
  - jsa_fast/kernels/linear.py: every matrix product, with the LayerNorm prologues and the
    bias, ReLU, residual and gate epilogues around it;
  - jsa_fast/kernels/slot_attention.py: logits, softmax over slots, + eps, key normalisation and
    the context Â^T x̂ for both modalities in one launch (the cross-modal maps on the last
    iteration), forward and backward;
  - jsa_fast/kernels/gru.py: the GRU's products and gates, forward, and the GRU and LN_ff
    backward as the epilogue of the product that feeds them;
  - jsa_fast/kernels/layer_norm.py: LN_in on the tokens of both modalities (mask tokens
    swapped in) and its backward with the token gradient, LN_slots' backward with its
    products.

How the operators are registered (triton_op on a GPU, custom_op under
TRITON_INTERPRET=1): jsa_fast/kernels/registry.py. Kernels never import training code.
"""

from jsa_fast.kernels.joint_slot_attention import joint_slot_attention
from jsa_fast.kernels.registry import INTERPRET

__all__ = ["INTERPRET", "joint_slot_attention"]
