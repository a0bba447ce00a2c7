"""Image and audio encoders: ResNet-18 trunks that turn inputs into JSA tokens.

Image: 3 x H x W -> ResNet-18 -> C x h x w -> 1x1 conv -> B x (h w) x d  (224 -> 49 tokens).
Audio: 1 x F x T log spectrogram -> ResNet-18 with a 1-channel first conv -> 1x1 conv ->
max over frequency -> B x t x d  (257 x 501 -> 16 tokens).

The trunk is torchvision's ResNet-18 (same blocks and state-dict keys) with an optional
narrower base width, so that the small presets train on a CPU and `pretrained=PATH` loads
a local torchvision checkpoint into the default width. Every convolution, the 1x1
projection included, is initialised kaiming-normal (fan_out, ReLU) as in the released
JSA code (resnet.py); the projection's bias keeps PyTorch's default there too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

__all__ = ["ResNet18Trunk", "ImageEncoder", "AudioEncoder", "resnet_output_size", "IMAGENET_WEIGHTS", "RANDOM_START"]

# What the paper and the released code fine-tune the image encoder from: torchvision's
# ResNet18_Weights.IMAGENET1K_V1 (nothing is downloaded here).
IMAGENET_WEIGHTS = "resnet18-f37072fd.pth"
RANDOM_START = {"weights": "random"}  # an encoder's `started_from` without pretrained weights


def resnet_output_size(n: int) -> int:
    """Spatial size after ResNet-18's five stride-2 stages (conv1, maxpool, layer2-4)."""
    n = (n + 2 * 3 - 7) // 2 + 1  # conv1: k7 s2 p3
    for _ in range(4):  # maxpool and the first conv of layer2-4: k3 s2 p1
        n = (n + 2 * 1 - 3) // 2 + 1
    return n


class ResNet18Trunk(nn.Module):
    """torchvision's ResNet-18 without avgpool/fc: B x in_channels x H x W -> B x 8w x h x w.

    base_width w = 64 is torchvision's network; smaller widths scale every stage.
    """

    def __init__(self, in_channels: int = 3, base_width: int = 64) -> None:
        super().__init__()
        if in_channels < 1 or base_width < 1:
            raise ValueError(f"in_channels and base_width must be >= 1, got {in_channels} and {base_width}")
        self.out_channels = 8 * base_width
        self.conv1 = nn.Conv2d(in_channels, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths = [base_width * m for m in (1, 2, 4, 8)]
        in_width = base_width
        for index, (width, stride) in enumerate(zip(widths, (1, 2, 2, 2)), start=1):
            downsample = None
            if stride != 1 or in_width != width:
                downsample = nn.Sequential(
                    nn.Conv2d(in_width, width, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(width)
                )
            blocks = [BasicBlock(in_width, width, stride, downsample), BasicBlock(width, width)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            in_width = width
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def load_torchvision_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Load a local torchvision ResNet-18 state dict: each of its tensors under its own
        name (this trunk uses torchvision's), BatchNorm statistics included, but fc.*,
        ImageNet's classifier, which the trunk has no place for. A 1-channel trunk takes
        the sum of conv1 over the RGB channels. ValueError naming the file for any other
        tensor missing, left over or of another shape.

        Returns what the trunk started from: {"weights": path, "sha256": the file's,
        "tensors": the number loaded, "unused": the names left out (fc.weight, fc.bias)}.
        """
        path = Path(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"pretrained={path} holds a {type(state).__name__}, not a state dict")
        unused = sorted(key for key in state if key.startswith("fc."))
        state = {key: value for key, value in state.items() if key not in unused}
        conv1 = state.get("conv1.weight")
        if conv1 is not None and conv1.shape[1] != self.conv1.in_channels:
            if self.conv1.in_channels != 1:
                raise ValueError(
                    f"pretrained conv1 has {conv1.shape[1]} input channels, the trunk {self.conv1.in_channels}"
                )
            state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
        try:
            self.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(
                f"pretrained={path} is not a ResNet-18 checkpoint of width {self.out_channels // 8}: {error}"
            ) from None
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return {"weights": str(path), "sha256": digest, "tensors": len(state), "unused": unused}


class _TokenEncoder(nn.Module):
    def __init__(self, in_channels: int, dim: int, base_width: int, pretrained: str | Path | None) -> None:
        super().__init__()
        self.trunk = ResNet18Trunk(in_channels, base_width)
        # what the trunk started from (`load_torchvision_checkpoint`), for the run's record
        self.started_from = (
            dict(RANDOM_START) if pretrained is None else self.trunk.load_torchvision_checkpoint(pretrained)
        )
        self.proj = nn.Conv2d(self.trunk.out_channels, dim, kernel_size=1)
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_out", nonlinearity="relu")

    def feature_map(self, x: Tensor, expected_channels: int, name: str) -> Tensor:
        if x.dim() != 4 or x.shape[1] != expected_channels:
            raise ValueError(f"{name} must be B x {expected_channels} x H x W, got shape {tuple(x.shape)}")
        return self.proj(self.trunk(x))


class ImageEncoder(_TokenEncoder):
    """B x 3 x H x W images -> B x (h w) x d tokens (h = w = 7 at 224 x 224)."""

    def __init__(self, dim: int = 512, base_width: int = 64, pretrained: str | Path | None = None) -> None:
        super().__init__(3, dim, base_width, pretrained)

    def forward(self, image: Tensor) -> Tensor:
        return self.feature_map(image, 3, "image").flatten(2).transpose(1, 2)


class AudioEncoder(_TokenEncoder):
    """B x 1 x F x T log spectrograms -> B x t x d tokens (t = 16 for 257 x 501)."""

    def __init__(self, dim: int = 512, base_width: int = 64, pretrained: str | Path | None = None) -> None:
        super().__init__(1, dim, base_width, pretrained)

    def forward(self, spec: Tensor) -> Tensor:
        return self.feature_map(spec, 1, "spec").amax(dim=2).transpose(1, 2)
