"""The evaluation protocol: how the maps are made from a model's inference and scored
(docs/model.md "Inference" and "Evaluation protocols"); evaluation, training's
validation and localisation all make their maps here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from jsa_fast.maps import UPSAMPLE_MODES, blend_maps, localization_maps, normalised_map
from jsa_fast.metrics import LocalizationEvaluator

__all__ = ["FIXED_THRESHOLD", "Protocol", "PROTOCOLS", "scored_maps"]

FIXED_THRESHOLD = 0.6  # the released code's; the table's second threshold under "median"


@dataclass(frozen=True)
class Protocol:
    """How the maps are made and scored (docs/model.md "Inference", "Evaluation protocols").

    upsample: "bilinear" (align_corners=True) or "bicubic" (align_corners=False), from
    the token grid to the image; threshold: "median" or a fixed cut on the min-max
    normalised map; alpha: IQR's weight on ca^{a,v}; temperature: the factor on the
    logits of the inference maps (the released code's `infer_sharpening`); ogl_alpha:
    OGL's weight on ca^{a,v}.
    """

    upsample: str
    threshold: str | float
    alpha: float
    temperature: float
    ogl_alpha: float = 0.4

    def __post_init__(self) -> None:
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {sorted(UPSAMPLE_MODES)}, got {self.upsample!r}")
        LocalizationEvaluator(self.threshold)  # its check of the threshold
        for name in ("alpha", "ogl_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")

    @property
    def thresholds(self) -> tuple[str | float, str | float]:
        """(this protocol's threshold, the other kind): the median and a fixed value,
        both scored; the first gives eval.json's top-level figures."""
        if self.threshold == "median":
            return "median", FIXED_THRESHOLD
        return self.threshold, "median"


PROTOCOLS = {
    # EZ-VSL, LVS, SSL-TIE; the paper's IQR alpha (eq. 14)
    "field": Protocol(upsample="bilinear", threshold="median", alpha=0.6, temperature=1.0),
    # the released JSA code (test_model.py): its sharpening factor for 10k-pair models
    "released": Protocol(upsample="bicubic", threshold=FIXED_THRESHOLD, alpha=0.4, temperature=0.1),
}


def scored_maps(
    ca: torch.Tensor, ia: torch.Tensor, obj: torch.Tensor | None, size: tuple[int, int], protocol: Protocol
) -> dict[str, torch.Tensor]:
    """The maps a protocol scores, B x H x W each in [0, 1], from B x h x w token-grid maps:
    "av" (ca^{a,v}), "iqr" and, when the object map `obj` is given, "obj" and "ogl"
    (norm(ogl_alpha norm(AV) + (1 - ogl_alpha) norm(OBJ)), the released test_model.py)."""
    av, iqr = localization_maps(ca, ia, size, protocol.alpha, protocol.upsample)
    maps = {"av": av, "iqr": iqr}
    if obj is not None:
        maps["obj"] = normalised_map(obj, size, protocol.upsample)
        maps["ogl"] = blend_maps(av, maps["obj"], protocol.ogl_alpha)
    return maps
