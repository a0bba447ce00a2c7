"""Map making: sound-source maps from the model's token-grid maps, as they are scored and
drawn (the metrics that score them are in `jsa_fast.metrics`).

Upsampling from the h x w token grid to the image (`upsample_map`, the two modes of
`UPSAMPLE_MODES`), min-max normalisation (`minmax_normalize`, EZ-VSL's), the combinations
of two normalised maps (`blend_maps`: IQR, paper eq. 14, and OGL), the ca^{a,v} and IQR
maps of a batch (`localization_maps`) and the centre-prior baseline (`centre_prior_map`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "UPSAMPLE_MODES",
    "upsample_map",
    "minmax_normalize",
    "normalised_map",
    "blend_maps",
    "localization_maps",
    "centre_prior_map",
]

# How each upsampling mode samples the input grid: the field's evaluators (EZ-VSL, LVS,
# SSL-TIE) interpolate bilinearly with align_corners=True, the released JSA code bicubically
# with align_corners=False.
UPSAMPLE_MODES = {"bilinear": True, "bicubic": False}  # mode -> align_corners


def upsample_map(map_2d: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Upsample maps to `size`: "bilinear" with align_corners=True (corner values are kept)
    or "bicubic" with align_corners=False (UPSAMPLE_MODES).

    map_2d: h x w or B x h x w float tensor; size: H (square) or (H, W).
    Returns H x W or B x H x W, same dtype and device.
    """
    if not isinstance(map_2d, torch.Tensor) or map_2d.dim() not in (2, 3):
        shape = tuple(map_2d.shape) if isinstance(map_2d, torch.Tensor) else type(map_2d).__name__
        raise ValueError(f"map_2d must be an h x w or B x h x w tensor, got {shape}")
    if not map_2d.is_floating_point():
        raise ValueError(f"map_2d must be a float tensor, got {map_2d.dtype}")
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"mode must be one of {sorted(UPSAMPLE_MODES)}, got {mode!r}")
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(out_hw) != 2 or not all(isinstance(s, int) and s > 0 for s in out_hw):
        raise ValueError(f"size must be a positive int or a pair of them, got {size!r}")
    as_images = map_2d.reshape(-1, 1, *map_2d.shape[-2:])
    out = F.interpolate(as_images, size=out_hw, mode=mode, align_corners=UPSAMPLE_MODES[mode])
    return out.reshape(*map_2d.shape[:-2], *out_hw)


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map over its last two axes to [0, 1].

    maps: ... x H x W float tensor. A constant map is returned unchanged (as EZ-VSL's
    ``normalize_img`` does) rather than divided by zero.
    """
    if maps.dim() < 2 or not maps.is_floating_point():
        raise ValueError(f"maps must be a float tensor of shape ... x H x W, got {tuple(maps.shape)} {maps.dtype}")
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    constant = span == 0
    scaled = (maps - low) / torch.where(constant, torch.ones_like(span), span)
    return torch.where(constant, maps, scaled)


def normalised_map(grid: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """A map on the token grid as it is scored: upsampled to `size` (`upsample_map`, as
    float32) and min-max normalised. grid: h x w or B x h x w -> H x W or B x H x W."""
    return minmax_normalize(upsample_map(grid.float(), size, mode))


def blend_maps(first: torch.Tensor, second: torch.Tensor, alpha: float) -> torch.Tensor:
    """norm(alpha first + (1 - alpha) second) of two normalised ... x H x W maps: IQR
    (ca^{a,v} with ia^{v,v}, paper eq. 14) and OGL (ca^{a,v} with the object map)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if first.shape != second.shape:
        raise ValueError(f"the maps to blend must have one shape, got {tuple(first.shape)} and {tuple(second.shape)}")
    return minmax_normalize(alpha * first + (1 - alpha) * second)


def localization_maps(
    ca: torch.Tensor, ia: torch.Tensor, size: tuple[int, int], alpha: float = 0.6, upsample: str = "bilinear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ca^{a,v} map and the IQR map (eq. 14) at `size` from B x h x w token-grid maps.

    Each map is upsampled (`upsample`: "bilinear", align_corners=True, the field's;
    "bicubic", align_corners=False, the released code's) and min-max normalised. IQR blends
    the normalised maps as the released evaluation does:
    norm(alpha norm(ca^{a,v}) + (1 - alpha) norm(ia^{v,v})). Returns two B x H x W maps.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if ca.dim() != 3 or ca.shape != ia.shape:
        raise ValueError(f"ca and ia must be B x h x w maps of one shape, got {tuple(ca.shape)} and {tuple(ia.shape)}")
    ca_map = normalised_map(ca, size, upsample)
    return ca_map, blend_maps(ca_map, normalised_map(ia, size, upsample), alpha)


def centre_prior_map(height: int, width: int, sigma_frac: float = 0.25) -> torch.Tensor:
    """The centre-prior baseline: an isotropic Gaussian centred on the image.

    sigma = sigma_frac * min(height, width) pixels. Returns a height x width float32
    tensor with 1 at the centre, to be scored like a model's map.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    if not sigma_frac > 0:
        raise ValueError(f"sigma_frac must be positive, got {sigma_frac}")
    sigma = sigma_frac * min(height, width)
    dy = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    dx = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    squared_dist = dy[:, None] ** 2 + dx[None, :] ** 2
    return torch.exp(-squared_dist / (2 * sigma**2))
