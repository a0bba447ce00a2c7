"""jsa-fast: Joint Slot Attention (CVPR 2025) for sound source localisation, made fast.

Public entry points (docs/api.md): the fused and reference JSA modules and the k-reciprocal
false-negative mask.
"""

from jsa_fast.fused import FusedJointSlotAttention
from jsa_fast.ops import k_reciprocal_mask
from jsa_fast.reference import JointSlotAttention, JSAOutput

__all__ = ["FusedJointSlotAttention", "JointSlotAttention", "JSAOutput", "k_reciprocal_mask"]
__version__ = "0.1.0"
