"""k-reciprocal false-negative masks: the reference on hand-checked ties, jsa_fast._C's op
(its C++ kernel, and its CUDA kernel when a GPU is present) against the reference bit
for bit (on exact similarities with many ties, and on random rows, whose near-ties are
far apart), the packed form, the general path, and the op under torch.compile and
opcheck."""

import pytest
import torch

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


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def implementation(request):
    op = IMPLEMENTATIONS[request.param]
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
BAD_INPUTS = {
    "k zero": (GOOD, GOOD, 0, "k"),
    "k above batch": (GOOD, GOOD, 5, "k"),
    "batch mismatch": (GOOD, torch.randn(5, 3), 2, "z_img and z_aud"),
    "width mismatch": (GOOD, torch.randn(4, 2), 2, "z_img and z_aud"),
    "1-D image": (torch.randn(4), GOOD, 2, "z_img"),
    "3-D audio": (GOOD, torch.randn(4, 3, 1), 2, "z_aud"),
    "integer image": (torch.ones(4, 3, dtype=torch.int64), GOOD, 2, "z_img"),
    "no columns": (GOOD[:, :0], GOOD[:, :0], 2, "z_img"),
    "nan image": (torch.tensor([[float("nan")]] * 4).expand(4, 3), GOOD, 2, "z_img"),
    "inf audio": (GOOD, GOOD.clone().index_fill_(0, torch.tensor([2]), float("inf")), 2, "z_aud"),
}
PYTHON_ONLY_BAD_INPUTS = {
    "k bool": (GOOD, GOOD, True, "k"),
    "k float": (GOOD, GOOD, 2.0, "k"),
    "k none": (GOOD, GOOD, None, "k"),
    "image not a tensor": ([[1.0, 0.0]], GOOD, 1, "z_img"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS) + sorted(PYTHON_ONLY_BAD_INPUTS))
def test_public_op_rejects_bad_input(case):
    z_img, z_aud, k, name = {**BAD_INPUTS, **PYTHON_ONLY_BAD_INPUTS}[case]
    with pytest.raises(ValueError, match=name):
        ops.k_reciprocal_mask(z_img, z_aud, k)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cpp_op_rejects_bad_input(case):
    # The C++ kernel repeats the checks: compiled graphs skip the Python ones.
    z_img, z_aud, k, name = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=name):
        torch.ops.jsa_fast.k_reciprocal_mask(z_img, z_aud, k)


@pytest.mark.parametrize("op", [torch.ops.jsa_fast.k_reciprocal_mask, ops.k_reciprocal_mask, reference.k_reciprocal_mask])
def test_float64_beyond_float32_range_is_rejected(op):
    # Finite in float64 but infinite once cast to float32, where the similarity is computed.
    z = torch.full((3, 2), 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match="z_img"):
        op(z, torch.ones(3, 2, dtype=torch.float64), 1)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_kernel_matches_reference_on_exact_ties(batch, dtype, device):
    for seed in range(12 if batch <= 64 else 4):
        z_img, z_aud = tied_rows(batch, 2 * seed, dtype), tied_rows(batch, 2 * seed + 1, dtype)
        for k in k_values(batch):
            assert_matches_reference(z_img, z_aud, k, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [32, 512])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_kernel_matches_reference_on_random_rows(batch, dtype, width, device):
    # Here the similarities are rounded, and the reference's matrix product sums in
    # another order than the kernel: the masks agree unless two similarities at a row's
    # k-th place lie within rounding of each other, which random rows practically never do.
    gen = torch.Generator().manual_seed(batch * width)
    for _ in range(4 if batch <= 64 else 2):
        z_img = torch.randn(batch, width, generator=gen).to(dtype)
        z_aud = torch.randn(batch, width, generator=gen).to(dtype)
        for k in k_values(batch):
            assert_matches_reference(z_img, z_aud, k, device)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_matches_reference_on_tight_clusters(device):
    # Rows within ~3e-2 of a few centres: a cluster's similarities (1 - 2e-3 .. 1) differ by less than
    # the bfloat16 filter's error bound (~8e-3), so whole clusters become candidates and the
    # float64 refinement alone orders them.
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 64, generator=gen)
    z_img = centres[torch.arange(300) % 4] + 3e-2 * torch.randn(300, 64, generator=gen)
    z_aud = centres[torch.arange(300) % 3] + 3e-2 * torch.randn(300, 64, generator=gen)
    for k in (5, 20, 100):
        assert_matches_reference(z_img, z_aud, k)
        if device == "cuda":
            # cuBLAS's float32 sums (the reference on CUDA) may order near-ties in a cluster
            # differently; the kernels' float64 sums agree across devices.
            got = ops.k_reciprocal_mask(z_img.cuda(), z_aud.cuda(), k).cpu()
            assert torch.equal(got, ops.k_reciprocal_mask(z_img, z_aud, k))


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_general_path_for_rows_with_many_candidates(device):
    # 2,100 copies of one direction (scaled) tie with each other: each has 2,100 candidates,
    # more than the fast path holds (kMaxCandidates = 2048), and takes the general path;
    # the 60 random rows keep the fast path. Ties still go to the lower index.
    gen = torch.Generator().manual_seed(4)
    scales = torch.rand(2100, 1, generator=gen) + 0.5
    copies = torch.zeros(2100, 16).index_fill_(1, torch.tensor([0]), 1.0) * scales
    z_img = torch.cat([copies, torch.randn(60, 16, generator=gen)])[torch.randperm(2160, generator=gen)]
    z_aud = torch.cat([copies[:1050], torch.randn(1110, 16, generator=gen)])
    for k in (1, 20):
        assert_matches_reference(z_img, z_aud, k, device)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_with_many_tiles_and_chunks(device, monkeypatch):
    # A 0.05 MiB scratch bound: filter tiles of 5-24 rows, general-path chunks of 1-6 rows
    # and list-sorting chunks of 10-3276 rows, so tile and chunk boundaries are crossed.
    monkeypatch.setenv("JSA_FAST_KRECIPROCAL_SCRATCH_MIB", "0.05")
    gen = torch.Generator().manual_seed(9)
    z_img, z_aud = tied_rows(540, 3, torch.float32), torch.randn(540, 32, generator=gen)
    for k in (1, 20, 300):
        assert_matches_reference(z_img, z_aud, k, device)
    z_copies = torch.zeros(2200, 8).index_fill_(1, torch.tensor([2]), 1.0)  # every row overflows
    assert_matches_reference(z_copies, torch.randn(2200, 8, generator=gen), 4, device)


def test_bad_scratch_bound_is_named(monkeypatch):
    monkeypatch.setenv("JSA_FAST_KRECIPROCAL_SCRATCH_MIB", "lots")
    with pytest.raises(ValueError, match="JSA_FAST_KRECIPROCAL_SCRATCH_MIB"):
        torch.ops.jsa_fast.k_reciprocal_mask(GOOD, GOOD, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [256, 257, 299])
def test_kernel_large_k_takes_the_general_path(device, k):
    # k = 256 is the fast path's largest; above it every row takes the general path.
    z_img, z_aud = tied_rows(300, 5, torch.float32), tied_rows(300, 6, torch.float32)
    assert_matches_reference(z_img, z_aud, k, device)
    gen = torch.Generator().manual_seed(k)
    assert_matches_reference(torch.randn(300, 32, generator=gen), torch.randn(300, 32, generator=gen), k, device)


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
    # neighbours are exactly its cluster in both modalities and R is known. The packed mask
    # is 512 MiB; the kernel's scratch (a 256 MiB filter tile, normalised rows, neighbour
    # lists) about as much again.
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


def test_kernel_matches_reference_on_strided_input():
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


def test_public_op_rejects_non_bool_packed():
    with pytest.raises(ValueError, match="packed"):
        ops.k_reciprocal_mask(GOOD, GOOD, 2, packed=1)


# ---------------------------------------------------------------------------------------
# torch.compile and opcheck
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True])
def test_cpp_op_under_torch_compile_fullgraph(packed):
    def masks(z_img, z_aud):
        return ops.k_reciprocal_mask(z_img, z_aud, k=5, packed=packed)

    compiled = torch.compile(masks, fullgraph=True)
    for seed in range(2):
        z_img, z_aud = tied_rows(40, seed, torch.float32), tied_rows(40, seed + 10, torch.float32)
        expected = reference.k_reciprocal_mask(z_img, z_aud, 5)
        assert torch.equal(compiled(z_img, z_aud), reference.pack_mask(expected) if packed else expected)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_cpp_op_passes_opcheck(requires_grad, packed):
    z_img = torch.randn(9, 6, requires_grad=requires_grad)
    z_aud = torch.randn(9, 6, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.jsa_fast.k_reciprocal_mask.default, (z_img, z_aud, 4, packed))
