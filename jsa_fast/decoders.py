"""Slot decoders g_v, g_a (paper eq. 10): slots -> reconstructed encoder tokens.

Each slot is broadcast over the token grid, a learned 2-D position embedding is added
(column and row embeddings of d/2 each, concatenated), an MLP [d -> d, ReLU] x 3 -> d + 1
decodes a feature and a mask logit per slot and position; the masks are softmaxed over
slots and the reconstruction is the mask-weighted sum of the slot features.
For d = 512 this is 1.05 M parameters (docs/model.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jsa_fast.reference import DIM

__all__ = ["SlotDecoder"]


class SlotDecoder(nn.Module):
    """B x S x d slots -> B x (grid_h grid_w) x feat_dim reconstruction."""

    def __init__(self, grid_h: int, grid_w: int, dim: int = DIM, feat_dim: int | None = None, depth: int = 3) -> None:
        super().__init__()
        if grid_h < 1 or grid_w < 1:
            raise ValueError(f"grid_h and grid_w must be >= 1, got {grid_h} x {grid_w}")
        if dim % 2:
            raise ValueError(f"dim must be even (the position embedding is split in halves), got {dim}")
        self.grid_h, self.grid_w = grid_h, grid_w
        self.feat_dim = dim if feat_dim is None else feat_dim
        self.row_embed = nn.Embedding(grid_h, dim // 2)
        self.col_embed = nn.Embedding(grid_w, dim // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(dim, dim), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dim, self.feat_dim + 1))

    def position_embedding(self) -> Tensor:
        """(grid_h grid_w) x d, row-major over the grid: [column embedding, row embedding]."""
        cols = self.col_embed.weight.unsqueeze(0).expand(self.grid_h, -1, -1)
        rows = self.row_embed.weight.unsqueeze(1).expand(-1, self.grid_w, -1)
        return torch.cat([cols, rows], dim=-1).flatten(0, 1)

    def forward(self, slots: Tensor) -> Tensor:
        if slots.dim() != 3:
            raise ValueError(f"slots must be B x S x d, got shape {tuple(slots.shape)}")
        decoded = self.mlp(slots.unsqueeze(2) + self.position_embedding())  # B x S x P x (feat_dim + 1)
        features, logits = decoded[..., :-1], decoded[..., -1]
        weights = logits.softmax(dim=1)  # over slots
        return torch.einsum("bspf,bsp->bpf", features, weights)
