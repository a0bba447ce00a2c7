"""Map making (jsa_fast.maps) against hand-computed values, and the layering that keeps
map making, scoring and the model apart."""

import ast
import math
from pathlib import Path

import pytest
import torch

from jsa_fast.maps import (
    blend_maps,
    centre_prior_map,
    localization_maps,
    minmax_normalize,
    normalised_map,
    upsample_map,
)
from jsa_fast.metrics import LocalizationEvaluator

PACKAGE = Path(__file__).resolve().parents[1] / "jsa_fast"


def test_upsample_map_keeps_corners_and_interpolates_linearly():
    small = torch.tensor([[0.0, 3.0], [6.0, 9.0]])
    # align_corners=True: output pixel i samples input position i * (2 - 1) / (4 - 1),
    # so out[i, j] = 6 * i / 3 + 3 * j / 3 = 2 i + j. (align_corners=False samples
    # (i + 0.5) / 2 - 0.5 and would give rows 0, 0.75, 2.25, 3 apart.)
    expected = 2 * torch.arange(4.0)[:, None] + torch.arange(4.0)[None, :]
    torch.testing.assert_close(upsample_map(small, 4), expected)
    batch = torch.rand(2, 7, 7)
    big = upsample_map(batch, (224, 160))
    assert big.shape == (2, 224, 160)
    for (r, c), (R, C) in zip([(0, 0), (0, -1), (-1, 0), (-1, -1)], [(0, 0), (0, -1), (-1, 0), (-1, -1)]):
        torch.testing.assert_close(big[:, R, C], batch[:, r, c])
    with pytest.raises(ValueError, match="map_2d"):
        upsample_map(torch.zeros(1, 1, 7, 7), 224)
    with pytest.raises(ValueError, match="size"):
        upsample_map(small, (0, 4))


def test_minmax_normalize_per_map_and_constant():
    maps = torch.tensor([[[2.0, 4.0], [6.0, 10.0]], [[5.0, 5.0], [5.0, 5.0]]])
    out = minmax_normalize(maps)
    assert torch.equal(out[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(out[1], maps[1])  # constant: unchanged, no NaN


def test_centre_prior_map():
    # 5 x 5, sigma = 0.2 * 5 = 1 pixel: 1 at the centre, exp(-d^2 / 2) elsewhere.
    prior = centre_prior_map(5, 5, sigma_frac=0.2)
    assert prior.shape == (5, 5)
    assert prior[2, 2] == 1.0
    assert prior[2, 3].item() == pytest.approx(math.exp(-0.5))
    assert prior[0, 0].item() == pytest.approx(math.exp(-4.0))
    assert torch.equal(prior, prior.T) and torch.equal(prior, prior.flip(0))
    # Scored like any map. 8 x 8: offsets from the centre are 0.5, 1.5, 2.5, 3.5; the
    # median cut keeps the 32 pixels with d^2 <= 8.5 (4 + 8 + 4 + 8 + 8 of them), of
    # which the centred 4 x 4 gt (d^2 <= 4.5) holds 16 -> 16 / (16 + 16).
    gt = torch.zeros(8, 8)
    gt[2:6, 2:6] = 1
    assert LocalizationEvaluator().update(centre_prior_map(8, 8), gt) == pytest.approx(0.5)


def test_normalised_map_upsamples_then_normalises():
    grid = torch.tensor([[1.0, 4.0], [7.0, 10.0]], dtype=torch.float64)
    # 2 x 2 -> 3 x 3 with align_corners=True: the centre is the mean (5.5), edges the
    # means of their two corners; min-max over 1..10 divides by 9 after subtracting 1.
    expected = (torch.tensor([[1.0, 2.5, 4.0], [4.0, 5.5, 7.0], [7.0, 8.5, 10.0]]) - 1) / 9
    out = normalised_map(grid, 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_blend_maps_is_the_normalised_weighted_sum():
    first = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    second = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # 0.75 first + 0.25 second = (0.25, 0.75, 0.375, 0.4375): min 0.25, span 0.5.
    expected = torch.tensor([[0.0, 1.0], [0.25, 0.375]])
    torch.testing.assert_close(blend_maps(first, second, 0.75), expected)
    with pytest.raises(ValueError, match="alpha"):
        blend_maps(first, second, 1.5)
    with pytest.raises(ValueError, match="one shape"):
        blend_maps(first, second[:1], 0.5)


def test_localization_maps_ca_and_iqr():
    ca = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    ia = 3 - ca
    ca_map, iqr = localization_maps(ca, ia, (2, 2), alpha=0.75)
    torch.testing.assert_close(ca_map, ca / 3)
    # 0.75 x + 0.25 (1 - x) = 0.25 + 0.5 x: normalised, x again.
    torch.testing.assert_close(iqr, ca / 3)
    # alpha = 0.5 makes the blend constant (0.5), which normalisation leaves as it is.
    _, flat = localization_maps(ca, ia, (2, 2), alpha=0.5)
    assert torch.equal(flat, torch.full((1, 2, 2), 0.5))
    with pytest.raises(ValueError, match="ca and ia"):
        localization_maps(ca, ia[0], (2, 2))
    with pytest.raises(ValueError, match="alpha"):
        localization_maps(ca, ia, (2, 2), alpha=-0.1)


def package_imports(module: str) -> set[str]:
    """The jsa_fast modules a module of the package imports, at any depth of its code."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jsa_fast"):
            names.add(node.module.removeprefix("jsa_fast.") or "jsa_fast")
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix("jsa_fast.") for a in node.names if a.name.startswith("jsa_fast"))
    return names


def test_map_making_scoring_and_model_are_layered():
    # maps builds maps from tensors alone; metrics scores them (and may use maps); the
    # model makes its maps through maps, never through the metrics.
    assert package_imports("maps") == set()
    assert package_imports("metrics") == {"maps"}
    assert "metrics" not in package_imports("model")
