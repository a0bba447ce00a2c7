"""The full JSA model: encoders + joint slot attention + decoders, and localisation.

forward(image: B x 3 x H x W, spec: B x 1 x F x T[, mask_img: B x Lv, mask_aud: B x La bool])
-> ModelOutput (what training needs);
localize(image, spec, alpha) -> the ca^{a,v} map and the IQR map at image resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor, nn

from jsa_fast.decoders import SlotDecoder
from jsa_fast.encoders import AudioEncoder, ImageEncoder, resnet_output_size
from jsa_fast.fused import FusedJointSlotAttention
from jsa_fast.metrics import minmax_normalize, upsample_map
from jsa_fast.reference import JSAOutput

__all__ = ["ModelConfig", "ModelOutput", "JSAModel", "localization_maps", "count_parameters"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; defaults are the paper's (SPEC.md "Shapes").

    image_size: square input side; spec_bins x spec_frames: the log-spectrogram size;
    encoder_width: ResNet-18 base width (64 = torchvision's network).
    """

    dim: int = 512
    num_slots: int = 2
    iters: int = 5
    mlp_hidden: int = 1024
    mask_prob: float = 0.1
    eps: float = 1e-8
    image_size: int = 224
    spec_bins: int = 257
    spec_frames: int = 501
    encoder_width: int = 64
    backend: str = "auto"
    pretrained_image: str | None = None
    pretrained_audio: str | None = None

    @property
    def image_grid(self) -> tuple[int, int]:
        side = resnet_output_size(self.image_size)
        return side, side

    @property
    def audio_tokens(self) -> int:
        return resnet_output_size(self.spec_frames)


class ModelOutput(NamedTuple):
    """tokens_*: encoder tokens (B x L x d, before masking and LayerNorm); jsa: JSAOutput;
    recon_*: decoder reconstructions of the tokens (B x L x d)."""

    tokens_img: Tensor
    tokens_aud: Tensor
    jsa: JSAOutput
    recon_img: Tensor
    recon_aud: Tensor


class JSAModel(nn.Module):
    """Encoders + FusedJointSlotAttention + slot decoders (paper Fig. 2)."""

    def __init__(self, cfg: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg.dim, cfg.encoder_width, cfg.pretrained_image)
        self.audio_encoder = AudioEncoder(cfg.dim, cfg.encoder_width, cfg.pretrained_audio)
        self.jsa = FusedJointSlotAttention(
            cfg.dim, cfg.num_slots, cfg.iters, cfg.mlp_hidden, cfg.mask_prob, cfg.eps, backend=cfg.backend
        )
        grid_h, grid_w = cfg.image_grid
        self.image_decoder = SlotDecoder(grid_h, grid_w, cfg.dim)
        self.audio_decoder = SlotDecoder(1, cfg.audio_tokens, cfg.dim)

    def encode(self, image: Tensor, spec: Tensor) -> tuple[Tensor, Tensor]:
        """-> image tokens B x Lv x d, audio tokens B x La x d."""
        if image.shape[0] != spec.shape[0]:
            raise ValueError(f"image and spec must share the batch size, got {tuple(image.shape)} and {tuple(spec.shape)}")
        return self.image_encoder(image), self.audio_encoder(spec)

    def forward(
        self, image: Tensor, spec: Tensor, mask_img: Tensor | None = None, mask_aud: Tensor | None = None
    ) -> ModelOutput:
        """Token masks as in FusedJointSlotAttention (None: drawn in training). Training
        passes them in so that they are drawn outside a compiled graph, and per global
        batch when several processes share it."""
        tokens_img, tokens_aud = self.encode(image, spec)
        jsa = self.jsa(tokens_img, tokens_aud, mask_img, mask_aud)
        return ModelOutput(
            tokens_img, tokens_aud, jsa, self.image_decoder(jsa.slots_img), self.audio_decoder(jsa.slots_aud)
        )

    def localize(self, image: Tensor, spec: Tensor, alpha: float = 0.6) -> tuple[Tensor, Tensor]:
        """Sound source maps at image resolution (paper Sec. 3.5), both B x H x W in [0, 1]:
        (min-max normalised ca^{a,v}, the IQR map); see `localization_maps`.
        Runs the model as it is (call .eval() first for inference without masking).
        """
        jsa = self.jsa(*self.encode(image, spec))
        return localization_maps(jsa, tuple(image.shape[-2:]), alpha)


def localization_maps(jsa: JSAOutput, size: tuple[int, int], alpha: float = 0.6) -> tuple[Tensor, Tensor]:
    """The ca^{a,v} map and the IQR map (eq. 14) of a JSA output, upsampled to `size`.

    The B x Lv maps are laid out on the encoder's token grid for an image of `size`,
    upsampled bilinearly (align_corners=True) and min-max normalised. IQR blends the
    normalised maps as the released evaluation does:
    norm(alpha norm(ca^{a,v}) + (1 - alpha) norm(ia^{v,v})). Returns two B x H x W maps.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    grid_h, grid_w = (resnet_output_size(n) for n in size)
    if grid_h * grid_w != jsa.ca_img.shape[1]:
        raise ValueError(f"size {size} gives a {grid_h} x {grid_w} token grid, but the maps hold {jsa.ca_img.shape[1]} tokens")
    ca = minmax_normalize(upsample_map(jsa.ca_img.float().reshape(-1, grid_h, grid_w), size))
    ia = minmax_normalize(upsample_map(jsa.ia_img.float().reshape(-1, grid_h, grid_w), size))
    return ca, minmax_normalize(alpha * ca + (1 - alpha) * ia)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
