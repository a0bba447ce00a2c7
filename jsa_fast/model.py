"""The full JSA model: encoders + joint slot attention + decoders, and localisation.

forward(image: B x 3 x H x W, spec: B x 1 x F x T[, mask_img: B x Lv, mask_aud: B x La bool])
-> ModelOutput (what training needs);
infer(image, spec, temperature) -> the inference maps on the token grid and the target
representations; localize(image, spec, alpha, ...) -> the ca^{a,v} map and the IQR map at
image resolution. ObjectSaliency is OGL's object map (an ImageNet ResNet-18).

Target and off-target slots (docs/model.md "Target and off-target slots"): the first T of the S = T + O slots are
targets. Their representation is the mean of the T L2-normalised slots
(`target_embedding`); the localisation maps sum the T target slots' maps.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from jsa_fast.data.audio import AudioConfig
from jsa_fast.data.image import ImageConfig
from jsa_fast.decoders import SlotDecoder
from jsa_fast.encoders import AudioEncoder, ImageEncoder, ResNet18Trunk, resnet_output_size
from jsa_fast.fused import BACKEND, BACKENDS, FusedJointSlotAttention
from jsa_fast.maps import localization_maps
from jsa_fast.reference import (
    DIM,
    EPS,
    ITERS,
    MASK_PROB,
    MLP_HIDDEN,
    NUM_SLOTS,
    JSAOutput,
    ModalitySlotAttention,
    slot_attention,
)
from jsa_fast.settings import check_fields, integer, number, one_of, setting

__all__ = [
    "ModelConfig",
    "ModelOutput",
    "Inference",
    "JSAModel",
    "ObjectSaliency",
    "slot_maps",
    "target_embedding",
    "count_parameters",
]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; defaults are the paper's (docs/model.md "Shapes").

    targets, off_targets: T target and O off-target slots (S = T + O; the paper's 1 and
    1); image_size: square input side; spec_bins x spec_frames: the log-spectrogram size
    (defaults: the preprocessing's, `ImageConfig` and `AudioConfig`); encoder_width:
    ResNet-18 base width (64 = torchvision's network). The slot attention's defaults are
    jsa_fast.reference's (DIM, MLP_HIDDEN, ...).
    """

    dim: int = setting(DIM, "d: the token and slot width", integer(1))
    targets: int = setting(1, "T: the first T slots are targets (S = T + O)", integer(1))
    off_targets: int = setting(
        NUM_SLOTS - 1,
        "O: off-target slots",
        integer(1),  # the divergence term needs one at least
        formerly={"num_slots": lambda slots: slots - 1 if isinstance(slots, int) and slots >= 1 else slots},
    )
    iters: int = setting(ITERS, "slot-attention iterations", integer(1))
    mlp_hidden: int = setting(MLP_HIDDEN, "hidden width of the slot update MLP", integer(1))
    mask_prob: float = setting(
        MASK_PROB, "probability that a token is replaced by the mask token in training", number(0, 1)
    )
    eps: float = EPS
    image_size: int = ImageConfig.size
    spec_bins: int = AudioConfig().spectrogram_shape[1]
    spec_frames: int = AudioConfig().spectrogram_shape[2]
    encoder_width: int = setting(64, "ResNet-18 base width of both encoders (64: torchvision's network)", integer(1))
    backend: str = setting(
        BACKEND, "joint slot attention: auto (Triton on CUDA, else PyTorch), triton or torch", one_of(BACKENDS)
    )
    pretrained_image: str | None = None
    pretrained_audio: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def num_slots(self) -> int:
        """S = T + O."""
        return self.targets + self.off_targets

    @property
    def image_grid(self) -> tuple[int, int]:
        side = resnet_output_size(self.image_size)
        return side, side

    @property
    def audio_tokens(self) -> int:
        return resnet_output_size(self.spec_frames)


class ModelOutput(NamedTuple):
    """tokens_*: encoder tokens (B x L x d, before masking and LayerNorm); jsa: JSAOutput;
    recon_*: decoder reconstructions of the tokens (B x L x d); target_ca_img: B x Lv x T,
    ca^{a,v} of each target slot; target_ca_aud: B x La x T, ca^{v,a} of each."""

    tokens_img: Tensor
    tokens_aud: Tensor
    jsa: JSAOutput
    recon_img: Tensor
    recon_aud: Tensor
    target_ca_img: Tensor
    target_ca_aud: Tensor


class Inference(NamedTuple):
    """What evaluation reads off a batch: ca, ia: B x h x w, the target slots' summed
    ca^{a,v} and ia^{v,v} on the token grid; p_img, p_aud: B x d target representations."""

    ca: Tensor
    ia: Tensor
    p_img: Tensor
    p_aud: Tensor


def slot_maps(
    keys_branch: ModalitySlotAttention,
    queries: Tensor,
    tokens: Tensor,
    mask: Tensor | None,
    eps: float,
    temperature: float = 1.0,
) -> Tensor:
    """Key-normalised attention Â of `queries` (B x S x d, Q_N of either modality) on
    the keys K = W_k LN_in(tokens) of `keys_branch`'s modality (tokens B x L x d, masked
    as `mask` B x L bool or None): B x L x S, with the logits K Q^T / sqrt(d) multiplied
    by `temperature` before the softmax over slots.

    The released code's inference "sharpening" (logits x 0.1) is this: it applies to the
    maps read off the last iteration only, not to the iterations. The logits are linear in
    Q, so scaling Q by the temperature scales them exactly; Q_N is an output of both the
    reference and the fused module, which therefore need no temperature of their own.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    keys = keys_branch.to_k(keys_branch.normalised_tokens(tokens.to(queries.dtype), mask))
    return slot_attention(queries * temperature, keys, eps)


def target_embedding(slots: Tensor, targets: int) -> Tensor:
    """The target representation (docs/model.md): slots B x S x d -> B x d, the mean of the
    first `targets` L2-normalised slots (the normalised target slot when T = 1)."""
    if not 1 <= targets < slots.shape[1]:
        raise ValueError(f"targets must be in [1, S - 1] = [1, {slots.shape[1] - 1}], got {targets!r}")
    return F.normalize(slots[:, :targets], dim=-1).mean(dim=1)


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
            raise ValueError(
                f"image and spec must share the batch size, got {tuple(image.shape)} and {tuple(spec.shape)}"
            )
        return self.image_encoder(image), self.audio_encoder(spec)

    def forward(
        self, image: Tensor, spec: Tensor, mask_img: Tensor | None = None, mask_aud: Tensor | None = None
    ) -> ModelOutput:
        """Token masks as in FusedJointSlotAttention (None: drawn in training). Training
        passes them in so that they are drawn outside a compiled graph, and per global
        batch when several processes share it."""
        tokens_img, tokens_aud = self.encode(image, spec)
        # Drawn here rather than in the module, so that the maps of further target slots
        # below see the same masks (the same draws, in the same order, as the module's).
        mask_img, mask_aud = self.jsa.resolve_masks(tokens_img, tokens_aud, mask_img, mask_aud)
        jsa = self.jsa(tokens_img, tokens_aud, mask_img, mask_aud)
        targets = self.cfg.targets
        if targets == 1:  # the module's own slot-0 maps
            target_ca_img, target_ca_aud = jsa.ca_img.unsqueeze(-1), jsa.ca_aud.unsqueeze(-1)
        else:
            target_ca_img = slot_maps(self.jsa.image, jsa.q_aud, tokens_img, mask_img, self.jsa.eps)[..., :targets]
            target_ca_aud = slot_maps(self.jsa.audio, jsa.q_img, tokens_aud, mask_aud, self.jsa.eps)[..., :targets]
        return ModelOutput(
            tokens_img, tokens_aud, jsa, self.image_decoder(jsa.slots_img), self.audio_decoder(jsa.slots_aud),
            target_ca_img, target_ca_aud,
        )  # fmt: skip

    def infer(self, image: Tensor, spec: Tensor, temperature: float = 1.0) -> Inference:
        """The inference maps (ca^{a,v}, ia^{v,v}; each the sum over the T target slots,
        logits x `temperature`, see `slot_maps`) on the token grid of `image`, and the
        target representations. Runs the model as it is (call .eval() first for inference
        without masking)."""
        tokens_img, tokens_aud = self.encode(image, spec)
        mask_img, mask_aud = self.jsa.resolve_masks(tokens_img, tokens_aud, None, None)
        jsa = self.jsa(tokens_img, tokens_aud, mask_img, mask_aud)
        grid = tuple(resnet_output_size(n) for n in image.shape[-2:])
        targets, eps = self.cfg.targets, self.jsa.eps

        def target_sum(queries: Tensor) -> Tensor:
            maps = slot_maps(self.jsa.image, queries, tokens_img, mask_img, eps, temperature)
            return maps[..., :targets].sum(dim=-1).reshape(-1, *grid)

        return Inference(
            target_sum(jsa.q_aud), target_sum(jsa.q_img),
            target_embedding(jsa.slots_img, targets), target_embedding(jsa.slots_aud, targets),
        )  # fmt: skip

    def localize(
        self, image: Tensor, spec: Tensor, alpha: float = 0.6, temperature: float = 1.0, upsample: str = "bilinear"
    ) -> tuple[Tensor, Tensor]:
        """Sound source maps at image resolution (paper Sec. 3.5), both B x H x W in [0, 1]:
        (min-max normalised ca^{a,v}, the IQR map); see `infer` and `localization_maps`.
        Runs the model as it is (call .eval() first for inference without masking).
        """
        maps = self.infer(image, spec, temperature)
        return localization_maps(maps.ca, maps.ia, tuple(image.shape[-2:]), alpha, upsample)


class ObjectSaliency(nn.Module):
    """OGL's object map (EZ-VSL; the released test_model.py): the mean over channels of
    |layer4 features| of an ImageNet ResNet-18, B x 3 x H x W (ImageNet-normalised)
    -> B x h x w (7 x 7 at 224). weights: a local torchvision ResNet-18 state dict."""

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        self.trunk = ResNet18Trunk(3, 64)
        try:
            self.trunk.load_torchvision_checkpoint(weights)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as error:
            raise ValueError(f"{weights} is not a torchvision ResNet-18 state dict ({error})") from None
        self.eval()

    def forward(self, image: Tensor) -> Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be B x 3 x H x W, got shape {tuple(image.shape)}")
        return self.trunk(image).abs().mean(dim=1)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
