"""Map making (jsa_fast.maps) against hand-computed values, and the layering that keeps
map making, scoring and the model apart."""

import ast
import math
from pathlib import Path

import numpy as np
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


# ----------------------------------------------------------------------------------
# Against slow, obvious implementations, on maps that are not square (issue #24): a
# swapped H and W, a dim=-1 for dim=-2 or a min for a max shows on no square map.
# ----------------------------------------------------------------------------------


def _slow_bilinear_align_corners(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear with align_corners=True, pixel by pixel in float64: output pixel (i, j)
    reads input position (i (h - 1) / (H - 1), j (w - 1) / (W - 1))."""
    h, w = grid.shape
    out = np.empty((out_h, out_w))
    for i in range(out_h):
        y = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(math.floor(y)), h - 1)
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(out_w):
            x = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(math.floor(x)), w - 1)
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = (1 - fx) * grid[y0, x0] + fx * grid[y0, x1]
            bottom = (1 - fx) * grid[y1, x0] + fx * grid[y1, x1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


def _cubic_weights_1d(size_in: int, size_out: int) -> np.ndarray:
    """size_out x size_in matrix of 1-D bicubic interpolation with align_corners=False as
    PyTorch defines it: Keys' kernel with A = -0.75, source position (o + 0.5) in / out
    - 0.5 (not clamped), the four taps floor(x) - 1 .. floor(x) + 2 clamped to the edge."""
    a = -0.75
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    weights = np.zeros((size_out, size_in))
    for o in range(size_out):
        x = (o + 0.5) * size_in / size_out - 0.5
        base = math.floor(x)
        t = x - base
        for tap, coefficient in zip(range(base - 1, base + 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            weights[o, min(max(tap, 0), size_in - 1)] += coefficient
    return weights


def _slow_bicubic(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Separable: rows, then columns (PyTorch's bicubic is the product of the 1-D ones)."""
    h, w = grid.shape
    return _cubic_weights_1d(h, out_h) @ grid @ _cubic_weights_1d(w, out_w).T


# float32 interpolation: each output is a sum of at most 16 products of an input in
# [0, 1] and a weight (|weights| sum to at most 1.3 for the cubic kernel, 1 for the linear
# one), computed with float32 sample positions; every operation rounds by at most
# 2^-24 relative, so the error stays below ~40 * 2^-24 * 1.3 ~ 3e-6. 1e-5 leaves margin
# and is still far below the differences a swapped axis or align_corners makes (> 1e-2).
FLOAT32_INTERP_ATOL = 1e-5


@pytest.mark.parametrize("mode,slow", [("bilinear", _slow_bilinear_align_corners), ("bicubic", _slow_bicubic)])
@pytest.mark.parametrize("grid_hw,out_hw", [((3, 5), (7, 4)), ((4, 2), (5, 9)), ((2, 3), (2, 3))])
def test_upsample_map_non_square_matches_slow_implementation(mode, slow, grid_hw, out_hw):
    gen = torch.Generator().manual_seed(11)
    grids = torch.rand(2, *grid_hw, generator=gen)
    out = upsample_map(grids, out_hw, mode)
    assert out.shape == (2, *out_hw) and out.dtype == torch.float32
    for b in range(2):
        expected = torch.from_numpy(slow(grids[b].double().numpy(), *out_hw)).float()
        torch.testing.assert_close(out[b], expected, atol=FLOAT32_INTERP_ATOL, rtol=0)
        # A single H x W map gives what its row of the batch gives.
        torch.testing.assert_close(upsample_map(grids[b], out_hw, mode), out[b], atol=0, rtol=0)


@pytest.mark.parametrize("mode,slow", [("bilinear", _slow_bilinear_align_corners), ("bicubic", _slow_bicubic)])
def test_upsample_map_float64_keeps_its_precision(mode, slow):
    grid = torch.rand(3, 5, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    out = upsample_map(grid, (6, 4), mode)
    assert out.dtype == torch.float64
    # float64: the same ~40 roundings of 2^-53 (~5e-15); 1e-12 would fail a float32 path
    # (errors ~1e-7).
    torch.testing.assert_close(out, torch.from_numpy(slow(grid.numpy(), 6, 4)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upsample_map_half_types_stay_half(dtype):
    # Inputs exact in the half type; the result is within a few of its ulps (eps 2^-10
    # for float16, 2^-7 for bfloat16, values in [0, 1]): 4 eps.
    grid = torch.tensor([[0.0, 0.5, 1.0], [0.25, 0.75, 0.125]], dtype=dtype)
    for mode, slow in (("bilinear", _slow_bilinear_align_corners), ("bicubic", _slow_bicubic)):
        out = upsample_map(grid, (3, 5), mode)
        assert out.dtype == dtype
        expected = torch.from_numpy(slow(grid.double().numpy(), 3, 5))
        torch.testing.assert_close(out.double(), expected, atol=4 * torch.finfo(dtype).eps, rtol=0)


def test_upsample_map_rejects_bad_input():
    with pytest.raises(ValueError, match="map_2d"):
        upsample_map(torch.zeros(4), 8)
    with pytest.raises(ValueError, match="map_2d"):
        upsample_map(np.zeros((2, 2)), 8)
    with pytest.raises(ValueError, match="float"):
        upsample_map(torch.zeros(2, 2, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="mode"):
        upsample_map(torch.zeros(2, 2), 8, "nearest")
    for size in ((4, 4, 4), (4,), (4.0, 4), (4, 4.5), (4, -1), -3, 0):
        with pytest.raises(ValueError, match="size"):
            upsample_map(torch.zeros(2, 2), size)
    assert upsample_map(torch.zeros(2, 2), (1, 1)).shape == (1, 1)


def test_minmax_normalize_non_square_and_leading_axes():
    gen = torch.Generator().manual_seed(13)
    maps = torch.rand(2, 3, 4, 7, generator=gen, dtype=torch.float64) * 10 - 3
    maps[1, 2] = 4.0  # one constant map among them
    out = minmax_normalize(maps)
    for index in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1)):
        m = maps[index].numpy()
        expected = (m - m.min()) / (m.max() - m.min())
        # float64: one subtraction and one division, each within 2^-53 relative; 1e-14.
        torch.testing.assert_close(out[index], torch.from_numpy(expected), atol=1e-14, rtol=0)
    assert torch.equal(out[1, 2], maps[1, 2])
    three_d = minmax_normalize(maps[0])
    assert torch.equal(three_d, out[0])
    assert torch.equal(minmax_normalize(maps[0, 1]), out[0, 1])  # a single H x W map


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_minmax_normalize_keeps_the_dtype_and_is_exact_on_powers_of_two(dtype):
    # Values 1 + v / 4, v = 0..11, on a 3 x 4 map: min 1, span 11 / 4 -> v / 11. With a
    # span of 2 (v = 0..8 of a 3 x 3 map read as 1 + v / 4) the division is exact in
    # every dtype. A 2 x 6 map of the same values: the same result whatever the layout.
    ramp = 1 + torch.arange(9, dtype=torch.float64).reshape(3, 3) / 4
    out = minmax_normalize(ramp.to(dtype))
    assert out.dtype == dtype
    assert torch.equal(out.double(), (ramp - 1) / 2)
    wide = 1 + torch.arange(12, dtype=torch.float64).reshape(2, 6) / 4
    expected = torch.arange(12, dtype=torch.float64).reshape(2, 6) / 11
    # One rounding of the division in dtype: half an ulp of values <= 1.
    torch.testing.assert_close(minmax_normalize(wide.to(dtype)).double(), expected, atol=torch.finfo(dtype).eps, rtol=0)


def test_minmax_normalize_rejects_bad_input():
    with pytest.raises(ValueError, match="float tensor"):
        minmax_normalize(torch.zeros(4))
    with pytest.raises(ValueError, match="float tensor"):
        minmax_normalize(torch.zeros(3, 3, dtype=torch.int64))


def test_normalised_map_non_square_and_batched():
    grid = torch.tensor([[[0.0, 2.0, 4.0], [1.0, 3.0, 9.0]], [[5.0, 5.0, 5.0], [5.0, 5.0, 1.0]]], dtype=torch.float64)
    out = normalised_map(grid, (3, 5))
    assert out.shape == (2, 3, 5) and out.dtype == torch.float32
    for b in range(2):
        up = _slow_bilinear_align_corners(grid[b].numpy(), 3, 5)
        expected = torch.from_numpy((up - up.min()) / (up.max() - up.min())).float()
        # float32 interpolation (FLOAT32_INTERP_ATOL on values up to 9, so 9x), then a
        # division by a span >= 4: well within 1e-5.
        torch.testing.assert_close(out[b], expected, atol=FLOAT32_INTERP_ATOL, rtol=0)


def test_blend_maps_accepts_the_ends_of_alpha_and_non_square_maps():
    gen = torch.Generator().manual_seed(14)
    first, second = (
        minmax_normalize(torch.rand(2, 3, 5, generator=gen)),
        minmax_normalize(torch.rand(2, 3, 5, generator=gen)),
    )
    torch.testing.assert_close(blend_maps(first, second, 1.0), first, atol=0, rtol=0)
    torch.testing.assert_close(blend_maps(first, second, 0.0), second, atol=0, rtol=0)
    mixed = 0.3 * first.double() + 0.7 * second.double()
    low = mixed.amin(dim=(1, 2), keepdim=True)
    expected = (mixed - low) / (mixed.amax(dim=(1, 2), keepdim=True) - low)
    # float32 blend and normalisation: a few roundings of values <= 1 (~1e-7 each),
    # divided by the span (here > 0.3): below 1e-6.
    torch.testing.assert_close(blend_maps(first, second, 0.3).double(), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="alpha"):
        blend_maps(first, second, -0.01)


def test_localization_maps_non_square_with_the_paper_alpha():
    # B = 2 token grids of 2 x 3 (h != w) to a 4 x 5 image (H != W). With the default
    # alpha = 0.6 (the paper's, eq. 14): IQR = norm(0.6 norm(ca) + 0.4 norm(ia)).
    gen = torch.Generator().manual_seed(15)
    ca, ia = torch.rand(2, 2, 3, generator=gen), torch.rand(2, 2, 3, generator=gen)
    ca_map, iqr = localization_maps(ca, ia, (4, 5))
    assert ca_map.shape == iqr.shape == (2, 4, 5)
    for b in range(2):
        up_ca = _slow_bilinear_align_corners(ca[b].double().numpy(), 4, 5)
        up_ia = _slow_bilinear_align_corners(ia[b].double().numpy(), 4, 5)
        norm = lambda m: (m - m.min()) / (m.max() - m.min())
        expected_ca, expected_iqr = norm(up_ca), norm(0.6 * norm(up_ca) + 0.4 * norm(up_ia))
        # float32 interpolation (FLOAT32_INTERP_ATOL) through two normalisations whose
        # spans are > 0.1 for these maps (asserted): at most 10x, 20x with the blend.
        assert np.ptp(up_ca) > 0.1 and np.ptp(up_ia) > 0.1 and np.ptp(0.6 * norm(up_ca) + 0.4 * norm(up_ia)) > 0.1
        torch.testing.assert_close(ca_map[b].double(), torch.from_numpy(expected_ca), atol=1e-4, rtol=0)
        torch.testing.assert_close(iqr[b].double(), torch.from_numpy(expected_iqr), atol=2e-4, rtol=0)
    bicubic_ca, _ = localization_maps(ca, ia, (4, 5), upsample="bicubic")
    up = _slow_bicubic(ca[0].double().numpy(), 4, 5)
    expected = torch.from_numpy((up - up.min()) / (up.max() - up.min()))
    torch.testing.assert_close(bicubic_ca[0].double(), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="ca and ia"):
        localization_maps(ca[0], ia[0], (4, 5))
    for alpha in (1.01, 2.0, -0.5):
        with pytest.raises(ValueError, match="alpha"):
            localization_maps(ca, ia, (4, 5), alpha=alpha)
        # alpha is checked before the maps (and before their shapes).
        with pytest.raises(ValueError, match="alpha"):
            localization_maps(ca, ia[0], (4, 5), alpha=alpha)
    _, only_ca = localization_maps(ca, ia, (4, 5), alpha=1.0)
    torch.testing.assert_close(only_ca, ca_map, atol=0, rtol=0)
    only_ia, _ = localization_maps(ia, ca, (4, 5))
    torch.testing.assert_close(localization_maps(ca, ia, (4, 5), alpha=0.0)[1], only_ia, atol=0, rtol=0)


def test_centre_prior_map_non_square_with_the_default_sigma():
    # 6 x 10: sigma = 0.25 * min(6, 10) = 1.5 pixels (the default sigma_frac), centre
    # (2.5, 4.5). Squared offsets are exact in float32 and so is 2 sigma^2 = 4.5; the
    # quotient (<= 31) rounds by half an ulp, which exp turns into a relative error of
    # <= 31 * 2^-24 ~ 2e-6, plus exp's own few ulps (~4e-7): rtol 3e-6.
    prior = centre_prior_map(6, 10)
    assert prior.shape == (6, 10) and prior.dtype == torch.float32
    expected = torch.tensor(
        [[math.exp(-((i - 2.5) ** 2 + (j - 4.5) ** 2) / (2 * 1.5**2)) for j in range(10)] for i in range(6)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(prior.double(), expected, rtol=3e-6, atol=0)
    # The same map on its side for 10 x 6 (min(H, W) is the same), and another sigma.
    torch.testing.assert_close(centre_prior_map(10, 6), prior.T, rtol=0, atol=0)
    # 1 x 4, sigma_frac 2: sigma = 2 * min(1, 4) = 2, offsets -1.5, -0.5, 0.5, 1.5.
    outer, inner = math.exp(-(1.5**2) / 8), math.exp(-(0.5**2) / 8)
    expected_row = torch.tensor([[outer, inner, inner, outer]], dtype=torch.float64)
    torch.testing.assert_close(centre_prior_map(1, 4, sigma_frac=2.0).double(), expected_row, rtol=3e-6, atol=0)
    torch.testing.assert_close(centre_prior_map(4, 1, sigma_frac=2.0).double(), expected_row.T, rtol=3e-6, atol=0)
    assert centre_prior_map(1, 1).tolist() == [[1.0]]
    for bad in ((0, 4), (4, 0)):
        with pytest.raises(ValueError, match="height and width"):
            centre_prior_map(*bad)
    for bad_sigma in (0.0, -0.25, float("nan")):
        with pytest.raises(ValueError, match="sigma_frac"):
            centre_prior_map(4, 4, sigma_frac=bad_sigma)
