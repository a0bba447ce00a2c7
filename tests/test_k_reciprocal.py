"""k-reciprocal false-negative masks: the reference on hand-checked ties, jsa_fast._C's op
(its C++ kernel, and its CUDA kernel when a GPU is present) against the reference bit
for bit (on exact similarities with many ties, and on random rows, whose near-ties are
far apart), the packed form, the general path, and the op under torch.compile and
opcheck."""

import re

import pytest
import torch
import torch.nn.functional as F

from jsa_fast import ops, reference

CPU = torch.device("cpu")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The extension's kernels: CPU in CI, CUDA on a GPU machine.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda])]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BATCH_SIZES = [1, 2, 7, 64, 300]
IMPLEMENTATIONS = {
    "reference": reference.k_reciprocal_mask,
    "cpp": torch.ops.jsa_fast.k_reciprocal_mask if ops.extension_available(CPU) else None,
}
# The kernels take a direct path (every row against all rows) up to a device's crossover
# and the filter (steps 2-4 of csrc/k_reciprocal.h) above it; these values of the
# variable force one path at any B.
DIRECT_MAX_BATCH = "JSA_FAST_KRECIPROCAL_DIRECT_MAX_BATCH"
PATH_LIMITS = {"filter": "0", "direct": str(2**31 - 1)}


def basis_rows(*columns: int, width: int = 4) -> torch.Tensor:
    """One one-hot row per entry of `columns`: len(columns) x width."""
    return torch.eye(width)[list(columns)]


def pairs_mask(batch: int, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """B x B bool, True exactly at (i, j) and (j, i) for every listed pair."""
    mask = torch.zeros(batch, batch, dtype=torch.bool)
    for i, j in pairs:
        mask[i, j] = mask[j, i] = True
    return mask


def tied_rows(batch: int, seed: int, dtype: torch.dtype, width: int = 32) -> torch.Tensor:
    """batch x width rows whose cosine similarities are exact in every float dtype.

    Rows repeat a few patterns of entries in {0, +-1} with exactly 4 or 16 non-zeros,
    each scaled by a power of two: the norms are powers of two, so the normalised entries
    are +-1/2 or +-1/4 and all dot products and their sums are exact. Repeated rows, and
    distinct patterns with equal overlaps, make many exact ties.
    """
    gen = torch.Generator().manual_seed(seed)
    num_patterns = 1 + batch // 6
    patterns = torch.zeros(num_patterns, width)
    for pattern in patterns:
        nonzeros = 4 if torch.rand((), generator=gen) < 0.5 else 16
        columns = torch.randperm(width, generator=gen)[:nonzeros]
        pattern[columns] = torch.randint(0, 2, (nonzeros,), generator=gen).float() * 2 - 1
    which = torch.randint(0, num_patterns, (batch,), generator=gen)
    scales = 2.0 ** torch.randint(-3, 4, (batch, 1), generator=gen).float()
    return (patterns[which] * scales).to(dtype)


def k_values(batch: int) -> list[int]:
    return sorted({1, min(2, batch), min(5, batch), min(20, batch), batch})


@pytest.fixture(autouse=True)
def filter_path_unless_asked(monkeypatch):
    """The kernels run their filter path here unless a test asks for `kernel_path`: at
    the small B of tests the CPU would otherwise always take its direct path."""
    monkeypatch.setenv(DIRECT_MAX_BATCH, PATH_LIMITS["filter"])


@pytest.fixture(params=sorted(PATH_LIMITS))
def kernel_path(request, monkeypatch):
    """Runs the test on each of the kernels' paths."""
    monkeypatch.setenv(DIRECT_MAX_BATCH, PATH_LIMITS[request.param])
    return request.param


@pytest.fixture(params=["reference", "cpp-filter", "cpp-direct"])
def implementation(request, monkeypatch):
    name, _, path = request.param.partition("-")
    if path:
        monkeypatch.setenv(DIRECT_MAX_BATCH, PATH_LIMITS[path])
    op = IMPLEMENTATIONS[name]
    assert op is not None, "jsa_fast._C is not built: run `pip install -e . --no-build-isolation`"
    return op


def test_extension_is_built_for_cpu():
    assert ops.extension_available(CPU)
    assert ops.extension_available("cpu")


# ---------------------------------------------------------------------------------------
# Hand-checked cases (both implementations)
# ---------------------------------------------------------------------------------------


def test_ties_go_to_the_lower_index(implementation):
    # Row 0 is e1, rows 1-4 are e0, k = 2. Row 0: similarities (1, 0, 0, 0, 0), its second
    # neighbour is the lowest of the tied rows 1-4, so N(0) = {0, 1}. Rows 1-4: (0, 1, 1,
    # 1, 1), so N = {1, 2} for each of them: rows 3 and 4 lose even themselves to the
    # lower duplicates. Mutual pairs: only (1, 2); (0, 1) fails as 0 is not in N(1).
    z = basis_rows(1, 0, 0, 0, 0)
    assert torch.equal(implementation(z, z, 2), pairs_mask(5, [(1, 2)]))


def test_scale_and_zero_rows_do_not_change_ties(implementation):
    # As above, but the rows are scaled (normalisation removes it) and row 0 is zero:
    # its similarity to every row, itself included, is 0, so N(0) = {0, 1} again.
    z = basis_rows(1, 0, 0, 0, 0) * torch.tensor([[0.0], [2.0], [0.25], [8.0], [1.0]])
    assert torch.equal(implementation(z, z, 2), pairs_mask(5, [(1, 2)]))


def test_mask_needs_both_modalities(implementation):
    # k = 3. Image rows e0, e0, e0, e1: N(0..2) = {0, 1, 2}, N(3) = {3, 0, 1}, so the
    # mutual image pairs are those within {0, 1, 2}. Audio rows e0, e1, e0, e0: mutual
    # pairs within {0, 2, 3}. Both hold only for (0, 2).
    z_img = basis_rows(0, 0, 0, 1)
    z_aud = basis_rows(0, 1, 0, 0)
    assert torch.equal(implementation(z_img, z_aud, 3), pairs_mask(4, [(0, 2)]))


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_k_one_gives_no_pairs(implementation, batch):
    # N(i) is a single row j; (i, j) is mutual only if N(j) = {i}, impossible for i != j.
    z_img, z_aud = tied_rows(batch, 0, torch.float32), tied_rows(batch, 1, torch.float32)
    assert not implementation(z_img, z_aud, 1).any()


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_k_batch_gives_all_pairs(implementation, batch):
    z_img, z_aud = torch.randn(batch, 8), torch.randn(batch, 8)
    expected = ~torch.eye(batch, dtype=torch.bool)
    assert torch.equal(implementation(z_img, z_aud, batch), expected)


def test_single_row(implementation):
    assert torch.equal(implementation(torch.ones(1, 3), torch.ones(1, 3), 1), torch.tensor([[False]]))


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

GOOD = torch.randn(4, 3)
F32 = "dtype torch.float32"
# case -> (z_img, z_aud, k, how the public op's message starts: the argument and what was
# seen; the reference adds the shape and dtype of a non-finite argument, the C++ op not)
BAD_INPUTS = {
    "k zero": (GOOD, GOOD, 0, "k must be an integer in [1, B=4], got 0"),
    "k above batch": (GOOD, GOOD, 5, "k must be an integer in [1, B=4], got 5"),
    "batch mismatch": (
        GOOD, torch.randn(5, 3), 2, f"z_img and z_aud must have one shape, got shape (4, 3), {F32} and shape (5, 3), {F32}"
    ),
    "width mismatch": (
        GOOD, torch.randn(4, 2), 2, f"z_img and z_aud must have one shape, got shape (4, 3), {F32} and shape (4, 2), {F32}"
    ),
    "1-D image": (torch.randn(4), GOOD, 2, f"z_img must be B x D (2-D), got shape (4,), {F32}"),
    "3-D audio": (GOOD, torch.randn(4, 3, 1), 2, f"z_aud must be B x D (2-D), got shape (4, 3, 1), {F32}"),
    "integer image": (
        torch.ones(4, 3, dtype=torch.int64), GOOD, 2, "z_img must be a floating-point tensor, got shape (4, 3), dtype torch.int64"
    ),
    "no columns": (GOOD[:, :0], GOOD[:, :0], 2, f"z_img must be non-empty, got shape (4, 0), {F32}"),
    "nan image": (
        torch.tensor([[float("nan")]] * 4).expand(4, 3), GOOD, 2,
        "z_img holds values that are not finite in float32",
    ),
    "inf audio": (
        GOOD, GOOD.clone().index_fill_(0, torch.tensor([2]), float("inf")), 2,
        "z_aud holds values that are not finite in float32",
    ),
}  # fmt: skip
PYTHON_ONLY_BAD_INPUTS = {
    "k bool": (GOOD, GOOD, True, "k must be an integer in [1, B=4], got True"),
    "k float": (GOOD, GOOD, 2.0, "k must be an integer in [1, B=4], got 2.0"),
    "k none": (GOOD, GOOD, None, "k must be an integer in [1, B=4], got None"),
    "image not a tensor": ([[1.0, 0.0]], GOOD, 1, "z_img must be a torch.Tensor, got list"),
    # A meta tensor has no values: the devices are told apart from metadata alone.
    "devices differ": (GOOD, GOOD.to("meta"), 2, "z_img and z_aud must be on one device, got cpu and meta"),
}


def named_argument(message: str) -> str:
    """The argument a message names first ("z_img and z_aud" for a pair)."""
    return re.match(r"z_img and z_aud|z_img|z_aud|k ", message).group(0).strip()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS) + sorted(PYTHON_ONLY_BAD_INPUTS))
def test_public_op_rejects_bad_input(case):
    z_img, z_aud, k, message = {**BAD_INPUTS, **PYTHON_ONLY_BAD_INPUTS}[case]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        ops.k_reciprocal_mask(z_img, z_aud, k)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cpp_op_rejects_bad_input(case):
    # Direct torch.ops callers get the C++ op's own checks, in its words.
    z_img, z_aud, k, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=named_argument(message)):
        torch.ops.jsa_fast.k_reciprocal_mask(z_img, z_aud, k)


def test_validation_reads_metadata_only():
    # Meta tensors have shapes, dtypes and a device but no values: reading one (a .item(),
    # a bool() of a reduction, any device sync) would raise.
    z = torch.empty(64, 8, device="meta")
    reference.check_k_reciprocal_inputs(z, z, 20)
    with pytest.raises(ValueError, match=r"^k must be an integer in \[1, B=64\], got 65$"):
        reference.check_k_reciprocal_inputs(z, z, 65)


@pytest.mark.gpu
@requires_cuda
def test_validation_does_not_sync_on_cuda():
    z = torch.randn(256, 16, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        reference.check_k_reciprocal_inputs(z, z, 20)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kernel", [True, False], ids=["extension", "reference fallback"])
def test_public_op_validates_once(monkeypatch, kernel):
    calls = []
    check = reference.check_k_reciprocal_inputs
    monkeypatch.setattr(reference, "check_k_reciprocal_inputs", lambda *args: calls.append(args) or check(*args))
    if not kernel:
        monkeypatch.setattr(ops, "_KERNEL_DEVICE_TYPES", frozenset())
    z_img, z_aud = tied_rows(16, 0, torch.float32), tied_rows(16, 1, torch.float32)
    assert torch.equal(ops.k_reciprocal_mask(z_img, z_aud, 3), reference.mutual_neighbour_mask(z_img, z_aud, 3))
    assert len(calls) == 1
    nan_rows = z_aud.clone().index_fill_(0, torch.tensor([5]), float("nan"))
    with pytest.raises(ValueError, match="z_aud holds values that are not finite"):
        ops.k_reciprocal_mask(z_img, nan_rows, 3)
    assert len(calls) == 2


@pytest.mark.parametrize(
    "op", [torch.ops.jsa_fast.k_reciprocal_mask, ops.k_reciprocal_mask, reference.k_reciprocal_mask]
)
def test_float64_beyond_float32_range_is_rejected(op):
    # Finite in float64 but infinite once cast to float32, where the similarity is computed.
    z = torch.full((3, 2), 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match="z_img"):
        op(z, torch.ones(3, 2, dtype=torch.float64), 1)


def with_bad_rows(z: torch.Tensor) -> torch.Tensor:
    """z (float64, at least 6 rows) with row 1 holding a NaN, row 3 an inf and row 5 a value
    finite in float64 but not in float32."""
    bad = z.to(torch.float64).clone()
    bad[1, 0], bad[3, -1], bad[5, 0] = float("nan"), float("-inf"), 1e300
    return bad


@pytest.mark.parametrize("path", [*sorted(PATH_LIMITS), None], ids=[*sorted(PATH_LIMITS), "reference fallback"])
def test_unchecked_rows_that_are_not_finite_count_as_zero_rows(monkeypatch, path):
    if path is None:
        monkeypatch.setattr(ops, "_KERNEL_DEVICE_TYPES", frozenset())
    else:
        monkeypatch.setenv(DIRECT_MAX_BATCH, PATH_LIMITS[path])
    z_img, z_aud = with_bad_rows(tied_rows(40, 0, torch.float32)), with_bad_rows(tied_rows(40, 1, torch.float32))
    zeroed_img, zeroed_aud = (z.clone().index_fill_(0, torch.tensor([1, 3, 5]), 0.0) for z in (z_img, z_aud))
    for k in (3, 20, 40):
        expected = reference.k_reciprocal_mask(zeroed_img, zeroed_aud, k)
        assert torch.equal(ops.k_reciprocal_mask(z_img, z_aud, k, check_finite=False), expected)
        packed = ops.k_reciprocal_mask(z_img, z_aud, k, packed=True, check_finite=False)
        assert torch.equal(packed, reference.pack_mask(expected))
    with pytest.raises(ValueError, match="z_img holds values that are not finite"):
        ops.k_reciprocal_mask(z_img, z_aud, 3)


# What reads a value back to the host inside the op (on CUDA each waits for the GPU):
# .item() and the like reach the dispatcher as aten::_local_scalar_dense, and nonzero
# must learn its output's size.
HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero")


def host_reads(call) -> list[str]:
    """The ops of HOST_READS that call() dispatches, nested ones included (the profiler
    records every op the dispatcher runs, also those a C++ kernel calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        call()
    return [event.name for event in profile.events() if event.name in HOST_READS]


@pytest.mark.parametrize(
    "path,k",
    [("direct", 20), ("direct", 200), ("filter", 200)],
    ids=["direct", "direct, large k", "every row through step 4 (CUDA's direct path)"],
)
def test_unchecked_op_reads_nothing_back_on_the_direct_paths(monkeypatch, path, k):
    # On the CPU's direct path, and through step 4 for every row: what CUDA's direct path
    # runs, reached here by a k above the filter's limit of max(B / 8, 128) = 128.
    monkeypatch.setenv(DIRECT_MAX_BATCH, PATH_LIMITS[path])
    gen = torch.Generator().manual_seed(k)
    z_img, z_aud = torch.randn(300, 32, generator=gen), torch.randn(300, 32, generator=gen)
    assert host_reads(lambda: ops.k_reciprocal_mask(z_img, z_aud, k, check_finite=False)) == []
    # Checked, each modality's finiteness is one read.
    assert host_reads(lambda: ops.k_reciprocal_mask(z_img, z_aud, k)) == ["aten::_local_scalar_dense"] * 2
    # The filter reads back what it found, per modality: its bound's two norms (one chunk
    # of rows here), the first tile's count of crowded rows and the rows for step 4.
    monkeypatch.setenv(DIRECT_MAX_BATCH, PATH_LIMITS["filter"])
    reads = host_reads(lambda: ops.k_reciprocal_mask(z_img, z_aud, 20, check_finite=False))
    assert reads == (["aten::_local_scalar_dense"] * 3 + ["aten::nonzero"]) * 2


# ---------------------------------------------------------------------------------------
# The C++ op against the reference, bit for bit
# ---------------------------------------------------------------------------------------


def assert_matches_reference(z_img: torch.Tensor, z_aud: torch.Tensor, k: int, device: str = "cpu") -> None:
    """The extension's kernel for `device` against the reference on that device, in both forms."""
    assert ops.extension_available(device), f"jsa_fast._C has no {device} kernel"
    z_img, z_aud = z_img.to(device), z_aud.to(device)
    expected = reference.k_reciprocal_mask(z_img, z_aud, k)
    got = ops.k_reciprocal_mask(z_img, z_aud, k)
    assert got.dtype == torch.bool and got.shape == expected.shape and got.device == expected.device
    assert torch.equal(got, expected), f"B={z_img.shape[0]}, k={k}: {int((got != expected).sum())} entries differ"
    packed = ops.k_reciprocal_mask(z_img, z_aud, k, packed=True)
    assert torch.equal(packed, reference.pack_mask(expected))


def similarities(z: torch.Tensor) -> torch.Tensor:
    """The kernels' similarities of z's rows (csrc/k_reciprocal.h): float64 sums of the
    products of the reference's normalised float32 rows, rounded to float32."""
    rows = F.normalize(z.float(), dim=1).double()
    return (rows @ rows.T).float()


def exact_similarity_mask(z_img: torch.Tensor, z_aud: torch.Tensor, k: int) -> torch.Tensor:
    """R as the reference defines it, with the kernels' similarities: where the reference's
    float32 products round near-ties differently, this is the mask the kernels must give."""
    masks = []
    for z in (z_img, z_aud):
        order = torch.sort(similarities(z), dim=1, descending=True, stable=True).indices[:, :k]
        nearest = torch.zeros(z.shape[0], z.shape[0], dtype=torch.bool).scatter_(1, order, True)
        masks.append(nearest & nearest.T)
    return (masks[0] & masks[1]).fill_diagonal_(False)


def assert_matches_exact_similarities(z_img: torch.Tensor, z_aud: torch.Tensor, k: int, device: str = "cpu") -> None:
    """The extension's kernel for `device` against exact_similarity_mask, in both forms."""
    expected = exact_similarity_mask(z_img, z_aud, k)
    got = ops.k_reciprocal_mask(z_img.to(device), z_aud.to(device), k).cpu()
    assert torch.equal(got, expected), f"B={z_img.shape[0]}, k={k}: {int((got != expected).sum())} entries differ"
    packed = ops.k_reciprocal_mask(z_img.to(device), z_aud.to(device), k, packed=True).cpu()
    assert torch.equal(packed, reference.pack_mask(expected))


@pytest.mark.numeric
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_kernel_matches_reference_on_exact_ties(batch, dtype, device, kernel_path):
    for seed in range(12 if batch <= 64 else 4):
        z_img, z_aud = tied_rows(batch, 2 * seed, dtype), tied_rows(batch, 2 * seed + 1, dtype)
        for k in k_values(batch):
            assert_matches_reference(z_img, z_aud, k, device)


@pytest.mark.numeric
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [32, 512])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_kernel_matches_reference_on_random_rows(batch, dtype, width, device, kernel_path):
    # Here the similarities are rounded, and the reference's matrix product sums in
    # another order than the kernel: the masks agree unless two similarities at a row's
    # k-th place lie within rounding of each other, which random rows practically never do.
    gen = torch.Generator().manual_seed(batch * width)
    for _ in range(4 if batch <= 64 else 2):
        z_img = torch.randn(batch, width, generator=gen).to(dtype)
        z_aud = torch.randn(batch, width, generator=gen).to(dtype)
        for k in k_values(batch):
            assert_matches_reference(z_img, z_aud, k, device)


@pytest.mark.numeric
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clusters", [40, 4])
def test_kernel_on_tight_clusters(device, clusters, kernel_path):
    # Rows within ~3e-2 of a few centres: a cluster's similarities (1 - 2e-3 .. 1) differ by
    # less than the bfloat16 filter's error, so whole clusters become candidates. 40
    # clusters of 15 rows stay within the filter's 128 candidates (max(B / 8, 128)), so the
    # float64 refinement alone orders them; 4 clusters of 150 exceed it and take the
    # general path.
    # Within a cluster, similarities come within float32 rounding of each other, which the
    # reference's float32 sums may order differently: the oracle is the exact one.
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(clusters, 64, generator=gen)
    z_img = centres[torch.arange(600) % clusters] + 3e-2 * torch.randn(600, 64, generator=gen)
    z_aud = centres[torch.arange(600) % (clusters - 1)] + 3e-2 * torch.randn(600, 64, generator=gen)
    for k in (5, 12, 100):
        assert_matches_exact_similarities(z_img, z_aud, k, device)


def filter_values(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The filter's values of row pairs (csrc/k_reciprocal.h, step 2): N x D, N x D -> N,
    float32 sums of the bfloat16-rounded rows' products, rounded to bfloat16."""
    return (x.bfloat16().float() * y.bfloat16().float()).sum(dim=1).bfloat16().float()


@pytest.mark.numeric
@pytest.mark.parametrize("device", DEVICES)
def test_filter_margin_keeps_neighbours_that_the_filter_misorders(device):
    # Rows q, a, b (searched for among random triples): a is q's nearest other row and q
    # is a's, by exact similarity, but the bfloat16 filter puts b above a for q. With k = 2
    # a true neighbour of q lies below q's k-th filter value: only the margin keeps it a
    # candidate, and R[q, a] tells. a and b lie on either side of q at angles theta and
    # theta + delta (delta ~ 1e-3, below the filter's error); the 61 other rows are
    # orthogonal to all three.
    gen = torch.Generator().manual_seed(0)
    q, side = F.normalize(torch.randn(2, 2000, 3, generator=gen), dim=2)
    side = F.normalize(side - (side * q).sum(dim=1, keepdim=True) * q, dim=1)  # orthogonal to q
    theta = 0.5 + 0.7 * torch.rand(2000, 1, generator=gen)
    delta = 1e-4 + 3e-3 * torch.rand(2000, 1, generator=gen)
    a = theta.cos() * q + theta.sin() * side
    b = (theta + delta).cos() * q - (theta + delta).sin() * side
    triples = F.pad(F.normalize(torch.stack([q, a, b], dim=1), dim=2), (0, 5))  # 2000 x 3 x 8
    q, a, b = triples.unbind(1)
    exact = {
        pair: (x.double() * y.double()).sum(dim=1)
        for pair, (x, y) in {"qa": (q, a), "qb": (q, b), "ab": (a, b)}.items()
    }
    misordered = (
        (exact["qa"] > exact["qb"] + 1e-5)
        & (exact["qa"] > exact["ab"] + 1e-5)
        & (filter_values(q, a) < filter_values(q, b))
    )
    assert misordered.any()
    z = torch.zeros(64, 8)
    z[:3] = triples[misordered.nonzero()[0, 0]]
    z[3:, 3:] = torch.randn(61, 5, generator=gen)
    expected = reference.k_reciprocal_mask(z, z, 2)
    assert expected[0, 1] and not expected[0, 2]
    assert_matches_reference(z, z, 2, device)


@pytest.mark.numeric
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_general_path_for_rows_with_many_candidates(device):
    # 2,100 copies of one direction (scaled) tie with each other: each has 2,100 candidates,
    # more than the filter's max(B / 8, 128) = 270, and takes the general path; the 60
    # random rows keep the filter. Ties still go to the lower index.
    gen = torch.Generator().manual_seed(4)
    scales = torch.rand(2100, 1, generator=gen) + 0.5
    copies = torch.zeros(2100, 16).index_fill_(1, torch.tensor([0]), 1.0) * scales
    z_img = torch.cat([copies, torch.randn(60, 16, generator=gen)])[torch.randperm(2160, generator=gen)]
    z_aud = torch.cat([copies[:1050], torch.randn(1110, 16, generator=gen)])
    for k in (1, 20):
        assert_matches_reference(z_img, z_aud, k, device)


@pytest.mark.numeric
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_with_many_tiles_and_chunks(device, monkeypatch, kernel_path):
    # A 0.05 MiB scratch bound: filter tiles of ~12 rows, general-path block rows of 1-4
    # rows, direct-path tiles of 12 rows (10 at B = 600) and list-sorting chunks of
    # 10-3276 rows, so tile and block boundaries are crossed.
    monkeypatch.setenv("JSA_FAST_KRECIPROCAL_SCRATCH_MIB", "0.05")
    gen = torch.Generator().manual_seed(9)
    z_img, z_aud = tied_rows(540, 3, torch.float32), torch.randn(540, 32, generator=gen)
    for k in (1, 20, 300):
        assert_matches_reference(z_img, z_aud, k, device)
    z_copies = torch.zeros(600, 8).index_fill_(1, torch.tensor([2]), 1.0)  # the filter: 600 candidates, step 4
    assert_matches_reference(z_copies, torch.randn(600, 8, generator=gen), 4, device)


def test_bad_scratch_bound_is_named(monkeypatch):
    monkeypatch.setenv("JSA_FAST_KRECIPROCAL_SCRATCH_MIB", "lots")
    with pytest.raises(ValueError, match="JSA_FAST_KRECIPROCAL_SCRATCH_MIB"):
        torch.ops.jsa_fast.k_reciprocal_mask(GOOD, GOOD, 2)


@pytest.mark.parametrize("value", ["many", "-1", "-0", "+5", " 5", "1.5", "12x", "9" * 19])
def test_bad_direct_path_limit_is_named(monkeypatch, value):
    monkeypatch.setenv(DIRECT_MAX_BATCH, value)
    with pytest.raises(ValueError, match=f"{DIRECT_MAX_BATCH} must be a whole number >= 0, got '{re.escape(value)}'"):
        torch.ops.jsa_fast.k_reciprocal_mask(GOOD, GOOD, 2)


@pytest.mark.numeric
@pytest.mark.parametrize("batch", [64, 2048])
def test_default_paths_give_the_exact_mask(monkeypatch, batch):
    # Unforced, the CPU takes its direct path at B = 64 and the filter at B = 2,048 (its
    # crossover lies between, csrc/k_reciprocal_cpu.cpp): told apart by the filter's host
    # reads. Either gives the mask of the kernels' similarities, on spread and collapsed rows.
    monkeypatch.delenv(DIRECT_MAX_BATCH)
    gen = torch.Generator().manual_seed(batch)
    z_img, z_aud = torch.randn(batch, 256, generator=gen), collapsed_rows(batch, 1e-2, 3)
    reads = host_reads(lambda: ops.k_reciprocal_mask(z_img, z_aud, 20, check_finite=False))
    assert (reads == []) == (batch == 64), reads
    assert_matches_exact_similarities(z_img, z_aud, 20)


@pytest.mark.numeric
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [128, 129, 256, 299])
def test_kernel_large_k_takes_the_general_path(device, k, kernel_path):
    # At B = 300 the filter serves k <= max(B / 8, 128) = 128; above it every row takes the
    # general path (on the filter's side of the crossover; the direct path takes any k).
    z_img, z_aud = tied_rows(300, 5, torch.float32), tied_rows(300, 6, torch.float32)
    assert_matches_reference(z_img, z_aud, k, device)
    gen = torch.Generator().manual_seed(k)
    assert_matches_reference(torch.randn(300, 32, generator=gen), torch.randn(300, 32, generator=gen), k, device)


# ---------------------------------------------------------------------------------------
# Collapsed embeddings: crowded similarities, the general path
# ---------------------------------------------------------------------------------------


def collapsed_exact_rows(batch: int, flips: int, seed: int, width: int = 256) -> torch.Tensor:
    """batch x width rows crowded around one row, with exact cosine similarities and many ties.

    A base row of +-1 entries; each row flips the signs of `flips` random entries and is
    scaled by a power of two. Norms are 16 times a power of two, so the normalised entries
    are +-1/16 (exact in every float dtype) and a dot product is 1 - 2 h / 256 for h
    differing signs: similarities take a few values within 4 flips / 256 of 1.
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 2, (width,), generator=gen).float() * 2 - 1
    signs = torch.ones(batch, width)
    signs.scatter_(1, torch.rand(batch, width, generator=gen).argsort(dim=1)[:, :flips], -1.0)
    return base * signs * 2.0 ** torch.randint(-3, 4, (batch, 1), generator=gen).float()


def collapsed_rows(batch: int, spread: float, seed: int, width: int = 256) -> torch.Tensor:
    """batch x width rows: one shared Gaussian mean plus spread times Gaussian noise (no ties)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, width, generator=gen) + spread * torch.randn(batch, width, generator=gen)


def crowded(z: torch.Tensor, k: int) -> torch.Tensor:
    """B bool: whether the row has more rows at or above its k-th similarity than the
    filter's limit, max(B / 8, 128). The filter admits all of those (csrc/k_reciprocal.h,
    step 2), so these rows take the general path."""
    sim = similarities(z)
    kth = sim.topk(k, dim=1).values[:, -1:]
    return (sim >= kth).sum(dim=1) > max(z.shape[0] // 8, 128)


@pytest.mark.numeric
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flips", [1, 2, 4])
def test_kernel_matches_reference_on_collapsed_exact_rows(device, flips, kernel_path):
    # Every row within a few flips of one row: similarities crowd into a few exact values
    # near 1, with ties at every row's k-th place; at k = 50 most rows take the general path.
    z_img, z_aud = collapsed_exact_rows(700, flips, 0), collapsed_exact_rows(700, flips, 1)
    assert crowded(z_img, 50).float().mean() > 0.5
    for k in (1, 5, 20, 50):
        assert_matches_reference(z_img, z_aud, k, device)


@pytest.mark.numeric
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spread", [0.03, 0.01, 1e-3])
def test_kernel_on_collapsed_rows_without_ties(device, spread, kernel_path):
    # Shared mean plus noise: all similarities within 2^-8 of 1, far inside the bfloat16
    # filter's window, so every row is a candidate of every row and takes the general path.
    # Near-ties within float32 rounding are the norm here (at 1e-3 the similarities span
    # a few hundred float32 steps), so the kernels' mask is the exact-similarity one.
    z_img, z_aud = collapsed_rows(600, spread, 2), collapsed_rows(600, spread, 3)
    assert similarities(z_img).min() > 1 - 2**-8 and similarities(z_aud).min() > 1 - 2**-8
    for k in (5, 20):
        assert_matches_exact_similarities(z_img, z_aud, k, device)


@pytest.mark.numeric
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_on_a_batch_dominated_by_one_class(device, monkeypatch):
    # Half the rows collapsed (general path), half spread (filter), shuffled: the general
    # path's rows also take columns outside their symmetric blocks. With a small scratch
    # bound the blocks are many and narrow; the first filter tile is a sample too small to
    # skip the filter for the rest. Exact rows in one modality, noisy ones in the other.
    monkeypatch.setenv("JSA_FAST_KRECIPROCAL_SCRATCH_MIB", "2")
    gen = torch.Generator().manual_seed(5)
    shuffle = torch.randperm(800, generator=gen)
    z_img = torch.cat([collapsed_exact_rows(400, 2, 6), tied_rows(400, 7, torch.float32, width=256)])[shuffle]
    z_aud = torch.cat([collapsed_rows(400, 1e-2, 8), torch.randn(400, 256, generator=gen)])[shuffle]
    for k in (5, 20):
        assert_matches_exact_similarities(z_img, z_aud, k, device)
        assert_matches_reference(z_img, z_img.flip(0), k, device)


@pytest.mark.numeric
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_skips_the_filter_after_a_crowded_first_tile(device):
    # The first tile's B / 16 = 63 rows are collapsed: the rest of the batch goes to the
    # general path without the filter, spread rows included, and the mask stays exact.
    z = torch.cat([collapsed_exact_rows(200, 1, 9), tied_rows(800, 10, torch.float32, width=256)])
    for k in (5, 20):
        assert crowded(z, k)[:63].all()
        assert_matches_reference(z, z.roll(1, 0), k, device)


@pytest.mark.gpu
@requires_cuda
def test_cuda_direct_path_unchecked_does_not_sync(monkeypatch):
    # B = 1,000 lies below CUDA's crossover (csrc/k_reciprocal_cuda.cu): step 4 for every
    # row, whose sizes are known without reading the data; the same mask as the CPU's.
    monkeypatch.delenv(DIRECT_MAX_BATCH)
    z_img, z_aud = tied_rows(1000, 0, torch.float32), tied_rows(1000, 1, torch.float32)
    expected = ops.k_reciprocal_mask(z_img, z_aud, 20)
    z_img, z_aud = z_img.cuda(), z_aud.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = ops.k_reciprocal_mask(z_img, z_aud, 20, check_finite=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(mask.cpu(), expected)


@pytest.mark.gpu
@requires_cuda
def test_cuda_kernel_matches_cpu_kernel_on_exact_ties():
    for seed in range(4):
        z_img, z_aud = tied_rows(1000, seed, torch.float32), tied_rows(1000, seed + 100, torch.float32)
        for k in (1, 20, 256, 300):
            on_cpu = ops.k_reciprocal_mask(z_img, z_aud, k)
            assert torch.equal(ops.k_reciprocal_mask(z_img.cuda(), z_aud.cuda(), k).cpu(), on_cpu)


@pytest.mark.gpu
@requires_cuda
def test_cuda_kernel_at_a_large_global_batch():
    # B = 65,536 (the bound), too large for the reference's B x B matrices: 4,096
    # shuffled clusters of 16 rows around random centres, k = 16, so that each row's
    # neighbours are exactly its cluster in both modalities and R is known; every row keeps
    # the filter. The packed mask is 512 MiB; the kernel's scratch (at most 512 MiB of
    # filter tiles and candidates), normalised rows and neighbour lists about as much again.
    batch, width, k = 65536, 512, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    cluster = torch.randperm(batch, device="cuda", generator=gen) // k
    z_img, z_aud = (
        torch.randn(batch // k, width, device="cuda", generator=gen)[cluster]
        + 1e-3 * torch.randn(batch, width, device="cuda", generator=gen)
        for _ in range(2)
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    words = ops.k_reciprocal_mask(z_img, z_aud, k, packed=True)
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 2 * 2**30, f"{extra / 2**20:.0f} MiB beyond the inputs"
    assert words.shape == (batch, batch // 32)
    for start in range(0, batch, 4096):
        rows = torch.arange(start, start + 4096, device="cuda")
        expected = cluster[rows, None] == cluster[None, :]
        expected[torch.arange(4096, device="cuda"), rows] = False
        assert torch.equal(ops.unpack_mask(words[start : start + 4096], batch), expected)


@pytest.mark.gpu
@requires_cuda
def test_cuda_kernel_on_collapsed_rows_at_16384():
    # The benchmark's GPU size, all rows crowded (the general path), against the reference.
    z_img, z_aud = collapsed_exact_rows(16384, 2, 11), collapsed_exact_rows(16384, 2, 12)
    assert_matches_reference(z_img, z_aud, 20, "cuda")


@pytest.mark.gpu
@requires_cuda
def test_cuda_kernel_on_collapsed_rows_at_a_large_global_batch():
    # B = 65,536 collapsed rows, every one on the general path, packed, within 2 GiB of extra
    # memory. Each row flips one of 256 signs of a shared row (collapsed_exact_rows): its
    # similarities are 1 to the rows that flipped the same entry and 1 - 2^-6 to all
    # others. With ~256 rows per entry and k = 16, N(i) is the 16 lowest-indexed rows that
    # flipped i's entry, so R pairs rows of one entry that are both among those 16, in both
    # modalities.
    batch, k = 65536, 16
    zs = [collapsed_exact_rows(batch, 1, seed) for seed in (13, 14)]
    first = []
    for z in zs:
        flipped = (z.sign() != z.sum(dim=0).sign()).int().argmax(dim=1)  # the column sums keep the shared signs
        assert torch.bincount(flipped, minlength=256).min() >= k
        order = torch.argsort(flipped * batch + torch.arange(batch))
        rank = torch.empty(batch, dtype=torch.long)
        rank[order] = torch.arange(batch) - torch.searchsorted(flipped[order], flipped[order])
        first.append((flipped.cuda(), (rank < k).cuda()))
    z_img, z_aud = (z.cuda() for z in zs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    words = ops.k_reciprocal_mask(z_img, z_aud, k, packed=True)
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 2 * 2**30, f"{extra / 2**20:.0f} MiB beyond the inputs"
    for start in range(0, batch, 4096):
        rows = torch.arange(start, start + 4096, device="cuda")
        expected = ~torch.zeros(4096, batch, dtype=torch.bool, device="cuda")
        for flipped, among_first in first:
            expected &= (flipped[rows, None] == flipped[None, :]) & among_first[rows, None] & among_first[None, :]
        expected[torch.arange(4096, device="cuda"), rows] = False
        assert torch.equal(ops.unpack_mask(words[start : start + 4096], batch), expected)


@pytest.mark.numeric
def test_kernel_matches_reference_on_strided_input(kernel_path):
    base = tied_rows(64, 7, torch.float32).T.contiguous()
    z_img = base.T  # 64 x 32, column-major
    z_aud = tied_rows(128, 8, torch.float32)[::2]
    assert not z_img.is_contiguous() and not z_aud.is_contiguous()
    for k in (3, 20):
        assert_matches_reference(z_img, z_aud, k)


# ---------------------------------------------------------------------------------------
# The packed form
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,columns", [(7, 1), (7, 31), (7, 32), (7, 33), (7, 100), (0, 5), (3, 0), (0, 0)])
def test_pack_unpack_round_trip(rows, columns):
    mask = torch.rand(rows, columns, generator=torch.Generator().manual_seed(columns)) < 0.4
    words = ops.pack_mask(mask)
    assert words.dtype == torch.int32 and words.shape == (rows, -(-columns // 32))
    assert torch.equal(ops.unpack_mask(words, columns), mask)


def test_pack_layout_and_sign_bit():
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, [0, 3, 31, 32]] = True
    # Column 31 is bit 31 of word 0, the int32 sign bit.
    assert ops.pack_mask(mask).tolist() == [[1 + 8 - 2**31, 1]]


def test_pack_unpack_reject_bad_input():
    with pytest.raises(ValueError, match="mask"):
        ops.pack_mask(torch.ones(3, 3))
    with pytest.raises(ValueError, match="words"):
        ops.unpack_mask(torch.ones(3, 1, dtype=torch.int64), 3)
    for columns in (33, 0, -1, 32.0, True):
        with pytest.raises(ValueError, match="columns"):
            ops.unpack_mask(torch.ones(3, 1, dtype=torch.int32), columns)


@pytest.mark.parametrize("flag", ["packed", "check_finite"])
def test_public_op_rejects_non_bool_flags(flag):
    with pytest.raises(ValueError, match=f"^{flag} must be a bool, got 1$"):
        ops.k_reciprocal_mask(GOOD, GOOD, 2, **{flag: 1})


# ---------------------------------------------------------------------------------------
# torch.compile and opcheck
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_cpp_op_under_torch_compile_fullgraph(packed, check_finite):
    def masks(z_img, z_aud):
        return ops.k_reciprocal_mask(z_img, z_aud, k=5, packed=packed, check_finite=check_finite)

    compiled = torch.compile(masks, fullgraph=True)
    for seed in range(2):
        z_img, z_aud = tied_rows(40, seed, torch.float32), tied_rows(40, seed + 10, torch.float32)
        expected = reference.k_reciprocal_mask(z_img, z_aud, 5)
        assert torch.equal(compiled(z_img, z_aud), reference.pack_mask(expected) if packed else expected)


@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_cpp_op_passes_opcheck(requires_grad, packed, check_finite):
    z_img = torch.randn(9, 6, requires_grad=requires_grad)
    z_aud = torch.randn(9, 6, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.jsa_fast.k_reciprocal_mask.default, (z_img, z_aud, 4, packed, check_finite))
