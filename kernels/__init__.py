"""Triton kernels of jsa-fast, one file per fused op.

Kernels never import training code; each is tested against `jsa_fast.reference`.
The fused joint-slot-attention kernels land with the issue "Fused Triton kernels for
joint slot attention, forward and backward, with benchmark".
"""
