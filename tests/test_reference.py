"""The reference JointSlotAttention against hand-checkable cases and the docs/api.md contract."""

import math

import pytest
import torch

from jsa_fast import FusedJointSlotAttention, JointSlotAttention, reference
from jsa_fast.reference import JSAOutput, slot_attention


def make_inputs(batch=3, l_img=5, l_aud=4, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, l_img, dim, generator=gen), torch.randn(batch, l_aud, dim, generator=gen)


def small_jsa(dim=8, **kwargs):
    torch.manual_seed(0)
    return JointSlotAttention(dim=dim, mlp_hidden=16, **kwargs)


@pytest.mark.numeric
def test_slot_attention_hand_computed():
    # d = 1, so M = K Q^T. Row 0: logits (0, 0) -> (1/2, 1/2); row 1: (ln 3, 0) -> (3/4, 1/4).
    # Column sums (1.25, 0.75) -> Â = [[0.4, 2/3], [0.6, 1/3]].
    q = torch.tensor([[[1.0], [0.0]]])
    k = torch.tensor([[[0.0], [math.log(3.0)]]])
    expected = torch.tensor([[[0.4, 2 / 3], [0.6, 1 / 3]]])
    torch.testing.assert_close(slot_attention(q, k, eps=0.0), expected)


@pytest.mark.numeric
def test_slot_attention_eps_is_added_before_key_normalisation():
    # Softmax of logits (100, -100) is (1, ~0): slot 1's column is eps everywhere, so
    # after normalisation over L = 4 keys it is uniform (1/4) instead of 0/0.
    q = torch.tensor([[[1.0], [-1.0]]])
    k = torch.full((1, 4, 1), 100.0)
    attn = slot_attention(q, k, eps=1e-8)
    torch.testing.assert_close(attn[0, :, 1], torch.full((4,), 0.25))


@pytest.mark.numeric
@pytest.mark.parametrize("num_slots,iters,l_img,l_aud", [(2, 5, 5, 4), (1, 1, 1, 1), (3, 2, 7, 3), (4, 3, 49, 16)])
def test_shapes_and_attention_columns_sum_to_one(num_slots, iters, l_img, l_aud):
    jsa = small_jsa(num_slots=num_slots, iters=iters).eval()
    x_img, x_aud = make_inputs(2, l_img, l_aud)
    out = jsa(x_img, x_aud)
    assert isinstance(out, JSAOutput)
    assert out.slots_img.shape == out.q_img.shape == (2, num_slots, 8)
    assert out.attn_img.shape == (2, l_img, num_slots) and out.attn_aud.shape == (2, l_aud, num_slots)
    assert out.ia_img.shape == out.ca_img.shape == (2, l_img)
    assert out.ia_aud.shape == out.ca_aud.shape == (2, l_aud)
    for attn in (out.attn_img, out.attn_aud):
        torch.testing.assert_close(attn.sum(dim=1), torch.ones(2, num_slots))
    for attention_map in (out.ia_img, out.ca_img, out.ia_aud, out.ca_aud):
        torch.testing.assert_close(attention_map.sum(dim=1), torch.ones(2))


@pytest.mark.numeric
def test_last_queries_and_maps_follow_the_equations():
    jsa = small_jsa(iters=3).eval()
    x_img, x_aud = make_inputs()
    out = jsa(x_img, x_aud)
    slots_0 = jsa.slots_init.expand(3, -1, -1)
    for branch, x, slots, q, attn in (
        (jsa.image, x_img, out.slots_img, out.q_img, out.attn_img),
        (jsa.audio, x_aud, out.slots_aud, out.q_aud, out.attn_aud),
    ):
        k, v = branch.keys_values(x, None)
        slots_before_last, _, _ = branch.iterate(slots_0, k, v, jsa.iters - 1, jsa.eps)
        q_last = branch.to_q(branch.norm_slots(slots_before_last))  # Q_N is computed from S_{N-1}
        torch.testing.assert_close(q, q_last)
        torch.testing.assert_close(attn, slot_attention(q_last, k, jsa.eps))
        updates = torch.einsum("bls,bld->bsd", attn, v)
        slots_bar = branch.gru(updates.reshape(-1, 8), slots_before_last.reshape(-1, 8)).reshape(3, 2, 8)
        torch.testing.assert_close(slots, slots_bar + branch.mlp(branch.norm_pre_ff(slots_bar)))
    k_img, _ = jsa.image.keys_values(x_img, None)
    k_aud, _ = jsa.audio.keys_values(x_aud, None)
    torch.testing.assert_close(out.ia_img, out.attn_img[..., 0])
    torch.testing.assert_close(out.ia_aud, out.attn_aud[..., 0])
    torch.testing.assert_close(out.ca_img, slot_attention(out.q_aud, k_img, jsa.eps)[..., 0])
    torch.testing.assert_close(out.ca_aud, slot_attention(out.q_img, k_aud, jsa.eps)[..., 0])


@pytest.mark.numeric
def test_shared_initial_slots_start_both_modalities():
    jsa = small_jsa(iters=1).eval()
    x_img, x_aud = make_inputs()
    out = jsa(x_img, x_aud)
    s0 = jsa.slots_init.expand(3, -1, -1)
    torch.testing.assert_close(out.q_img, jsa.image.to_q(jsa.image.norm_slots(s0)))
    torch.testing.assert_close(out.q_aud, jsa.audio.to_q(jsa.audio.norm_slots(s0)))


@pytest.mark.numeric
def test_masked_tokens_are_replaced_before_layernorm():
    jsa = small_jsa().eval()
    x_img, x_aud = make_inputs()
    mask_img = torch.zeros(3, 5, dtype=torch.bool)
    mask_img[:, [1, 3]] = True
    mask_aud = torch.zeros(3, 4, dtype=torch.bool)
    mask_aud[0, 0] = True
    out = jsa(x_img, x_aud, mask_img, mask_aud)
    replaced_img = x_img.clone()
    replaced_img[mask_img] = jsa.image.mask_token.reshape(-1)
    replaced_aud = x_aud.clone()
    replaced_aud[mask_aud] = jsa.audio.mask_token.reshape(-1)
    for a, b in zip(out, jsa(replaced_img, replaced_aud)):
        torch.testing.assert_close(a, b)
    # What a masked token held does not matter.
    scrambled = x_img.clone()
    scrambled[mask_img] = 1e3
    torch.testing.assert_close(jsa(scrambled, x_aud, mask_img, mask_aud).slots_img, out.slots_img)


@pytest.mark.numeric
def test_eval_mode_does_not_mask_and_training_does():
    jsa = small_jsa(mask_prob=0.5)
    x_img, x_aud = make_inputs()
    jsa.eval()
    torch.manual_seed(1)
    first = jsa(x_img, x_aud)
    torch.manual_seed(2)
    second = jsa(x_img, x_aud)
    torch.testing.assert_close(first.slots_img, second.slots_img)
    none_masked = jsa(x_img, x_aud, torch.zeros(3, 5, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.bool))
    torch.testing.assert_close(first.slots_img, none_masked.slots_img)
    jsa.train()
    torch.manual_seed(1)
    trained = jsa(x_img, x_aud)
    assert not torch.allclose(trained.slots_img, first.slots_img)


def test_training_masks_are_bernoulli_mask_prob():
    jsa = small_jsa(mask_prob=0.1).train()
    x_img, x_aud = make_inputs(batch=400, l_img=50, l_aud=1)
    mask_img, mask_aud = jsa.resolve_masks(x_img, x_aud, None, None)
    assert mask_img.dtype == torch.bool and mask_img.shape == (400, 50)
    assert abs(mask_img.float().mean().item() - 0.1) < 0.01
    given = torch.ones(400, 1, dtype=torch.bool)
    assert jsa.resolve_masks(x_img, x_aud, None, given)[1] is given


def test_gradient_reaches_every_parameter_and_the_initial_slots():
    jsa = small_jsa(iters=3)
    x_img, x_aud = make_inputs()
    x_img.requires_grad_(True)
    mask_img = torch.zeros(3, 5, dtype=torch.bool)
    mask_img[0, 0] = True
    mask_aud = torch.zeros(3, 4, dtype=torch.bool)
    mask_aud[1, 2] = True
    out = jsa(x_img, x_aud, mask_img, mask_aud)
    gen = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in out)
    loss.backward()
    for name, parameter in jsa.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert x_img.grad.abs().sum() > 0


def test_state_dict_keys_follow_the_api():
    jsa = JointSlotAttention()
    keys = set(jsa.state_dict())
    assert jsa.state_dict()["slots_init"].shape == (1, 2, 512)
    for m in ("image", "audio"):
        assert jsa.state_dict()[f"{m}.mask_token"].shape == (1, 1, 512)
        for layer in ("norm_input", "norm_slots", "norm_pre_ff", "to_q", "to_k", "to_v", "mlp.0", "mlp.2"):
            assert {f"{m}.{layer}.weight", f"{m}.{layer}.bias"} <= keys
        assert {f"{m}.gru.weight_ih", f"{m}.gru.weight_hh", f"{m}.gru.bias_ih", f"{m}.gru.bias_hh"} <= keys
    assert jsa.state_dict()["image.mlp.0.weight"].shape == (1024, 512)


def test_parameter_count_matches_the_paper():
    jsa = JointSlotAttention()
    count = sum(p.numel() for p in jsa.parameters())
    # per modality: 3 LayerNorms 3,072 + W_q,k,v 787,968 + GRUCell 1,575,936 + MLP 1,050,112
    # + mask token 512 = 3,417,600; two modalities + S_0 (1,024).
    assert count == 6_836_224
    assert round(count / 1e6, 2) == 6.84


@pytest.mark.numeric
def test_fused_and_reference_state_dicts_are_interchangeable():
    reference = small_jsa().eval()
    fused = FusedJointSlotAttention(dim=8, mlp_hidden=16, backend="torch").eval()
    assert set(fused.state_dict()) == set(reference.state_dict())
    fused.load_state_dict(reference.state_dict())
    x_img, x_aud = make_inputs()
    for a, b in zip(fused(x_img, x_aud), reference(x_img, x_aud)):
        torch.testing.assert_close(a, b)
    reference.load_state_dict(FusedJointSlotAttention(dim=8, mlp_hidden=16).state_dict())


def test_fused_backend_choice():
    assert FusedJointSlotAttention(dim=8, mlp_hidden=16).backend == "auto"
    assert FusedJointSlotAttention(dim=8, backend="triton").backend == "triton"
    with pytest.raises(ValueError, match="backend"):
        FusedJointSlotAttention(dim=8, backend="cuda")


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_inputs_give_outputs_of_their_dtype(dtype):
    jsa = small_jsa().eval()
    x_img, x_aud = make_inputs()
    out = jsa(x_img.to(dtype), x_aud.to(dtype))
    reference = jsa(x_img.to(dtype).float(), x_aud.to(dtype).float())
    for a, b in zip(out, reference):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.to(dtype).float())


@pytest.mark.parametrize(
    "args,name",
    [
        ((torch.randn(3, 5), torch.randn(3, 4, 8)), "x_img"),
        ((torch.randn(3, 5, 8), torch.randn(3, 4, 8, 1)), "x_aud"),
        ((torch.randn(3, 5, 8), torch.randn(2, 4, 8)), "batch"),
        ((torch.randn(3, 5, 7), torch.randn(3, 4, 8)), "x_img"),
        ((torch.randn(3, 5, 8), torch.ones(3, 4, 8, dtype=torch.int64)), "x_aud"),
        ((torch.randn(3, 5, 8), torch.randn(3, 4, 8), torch.zeros(3, 4, dtype=torch.bool)), "mask_img"),
        ((torch.randn(3, 5, 8), torch.randn(3, 4, 8), None, torch.zeros(3, 4)), "mask_aud"),
        (("not a tensor", torch.randn(3, 4, 8)), "x_img"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(args, name):
    jsa = small_jsa()
    with pytest.raises(ValueError, match=name):
        jsa(*args)


@pytest.mark.parametrize(
    "kwargs,name",
    [({"num_slots": 0}, "num_slots"), ({"iters": 0}, "iters"), ({"mask_prob": 1.0}, "mask_prob"), ({"dim": -1}, "dim")],
)
def test_bad_constructor_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        JointSlotAttention(**kwargs)


# ----------------------------------------------------------------------------------
# The reference k-reciprocal mask (paper eq. 12-13) against a slow implementation written
# out here (issue #24); test_k_reciprocal.py checks the kernels against the reference.
# Named *k_reciprocal*: tools/mutants.py selects these by name.
# ----------------------------------------------------------------------------------


def exact_rows(batch: int, seed: int, width: int = 8) -> torch.Tensor:
    """batch x width rows of 4 entries +-1 (the others 0) times powers of two: norms are
    powers of two, so the normalised entries are +-1/2 and every cosine is an exact
    multiple of 1/4 in float32 and float64 (equal cosines are exact ties)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.zeros(batch, width)
    for row in rows:
        row[torch.randperm(width, generator=gen)[:4]] = torch.randint(0, 2, (4,), generator=gen).float() * 2 - 1
    return rows * 2.0 ** torch.randint(-3, 4, (batch, 1), generator=gen).float()


def k_reciprocal_by_hand(z_img: torch.Tensor, z_aud: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 12-13 pair by pair: N(i) = the k rows of largest cosine with row i (itself
    included, ties to the lower index); i and j (i != j) are false negatives when each is
    in the other's N in both modalities."""

    def neighbours(z):
        z = z.double() / z.double().norm(dim=1, keepdim=True)
        sim = (z @ z.T).tolist()
        return [set(sorted(range(len(z)), key=lambda j: (-sim[i][j], j))[:k]) for i in range(len(z))]

    n_img, n_aud = neighbours(z_img), neighbours(z_aud)
    batch = len(n_img)
    return torch.tensor(
        [
            [i != j and j in n_img[i] and i in n_img[j] and j in n_aud[i] and i in n_aud[j] for j in range(batch)]
            for i in range(batch)
        ]
    )


@pytest.mark.numeric
@pytest.mark.parametrize("batch,k", [(6, 1), (6, 3), (12, 4), (30, 7), (30, 20), (30, 30)])
def test_reference_k_reciprocal_mask_matches_the_slow_one(batch, k):
    z_img, z_aud = exact_rows(batch, seed=batch), exact_rows(batch, seed=batch + 100)
    expected = k_reciprocal_by_hand(z_img, z_aud, k)
    assert torch.equal(reference.k_reciprocal_mask(z_img, z_aud, k), expected)
    assert torch.equal(reference.mutual_neighbour_mask(z_img, z_aud, k), expected)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):  # exact rows: the same mask
        assert torch.equal(reference.k_reciprocal_mask(z_img.to(dtype), z_aud.to(dtype), k), expected)


@pytest.mark.numeric
def test_reference_k_reciprocal_needs_mutual_neighbours_in_both_modalities():
    # Image rows on a line of angles 0, 10, 30, 70 degrees (k = 2: each row and its
    # nearest): N(0) = {0, 1}, N(1) = {1, 0}, N(2) = {2, 1}, N(3) = {3, 2}. Mutual: only
    # (0, 1); (2, 1) is one-way. Audio: the same, or with rows 0 and 1 far apart.
    angles = torch.tensor([0.0, 10.0, 30.0, 70.0]).deg2rad()
    line = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert torch.equal(k_reciprocal_by_hand(line, line, 2), pairs(4, [(0, 1)]))
    assert torch.equal(reference.k_reciprocal_mask(line, line, 2), pairs(4, [(0, 1)]))
    # Audio rows where 0 and 1 are not neighbours but 2 and 3 are: no pair is in both.
    audio = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    assert torch.equal(k_reciprocal_by_hand(line, audio, 2), torch.zeros(4, 4, dtype=torch.bool))
    assert torch.equal(reference.k_reciprocal_mask(line, audio, 2), torch.zeros(4, 4, dtype=torch.bool))
    assert torch.equal(reference.k_reciprocal_mask(audio, audio, 2), pairs(4, [(2, 3)]))
    # Lengths do not matter (cosine): rows scaled by 1e-3 .. 1e3 give the same mask.
    scaled = line * torch.tensor([[1e-3], [1e3], [1.0], [7.0]])
    assert torch.equal(reference.k_reciprocal_mask(scaled, line, 2), pairs(4, [(0, 1)]))


def pairs(batch: int, listed: list[tuple[int, int]]) -> torch.Tensor:
    mask = torch.zeros(batch, batch, dtype=torch.bool)
    for i, j in listed:
        mask[i, j] = mask[j, i] = True
    return mask


@pytest.mark.numeric
def test_reference_k_reciprocal_ties_go_to_the_lower_index_and_default_k_is_20():
    # Rows 0..4 identical (ties everywhere), k = 2: every row's N is {itself, the lowest
    # other}: N(0) = {0, 1}, N(i > 0) = {0, i}. Mutual pairs: (0, 1) only.
    same = torch.ones(5, 3)
    assert torch.equal(reference.k_reciprocal_mask(same, same, 2), pairs(5, [(0, 1)]))
    # A large tie group, where an unstable sort could reorder: 40 identical rows, k = 20:
    # N(i) = {0..19} for every i (row i >= 20 is not among its own 20 nearest): mutual
    # pairs exactly among rows 0..19.
    many = torch.ones(40, 2)
    expected = torch.zeros(40, 40, dtype=torch.bool)
    expected[:20, :20] = True
    expected.fill_diagonal_(False)
    assert torch.equal(reference.k_reciprocal_mask(many, many, 20), expected)
    # k defaults to the paper's 20: on 30 exact rows, 20 and 21 give different masks.
    z_img, z_aud = exact_rows(30, seed=5), exact_rows(30, seed=6)
    assert not torch.equal(k_reciprocal_by_hand(z_img, z_aud, 20), k_reciprocal_by_hand(z_img, z_aud, 21))
    assert torch.equal(reference.k_reciprocal_mask(z_img, z_aud), k_reciprocal_by_hand(z_img, z_aud, 20))


@pytest.mark.numeric
def test_reference_k_reciprocal_single_row_and_width_one():
    assert torch.equal(
        reference.k_reciprocal_mask(torch.ones(1, 4), torch.ones(1, 4), 1), torch.zeros(1, 1, dtype=torch.bool)
    )
    # D = 1: rows are +1 or -1 directions. k = 2 over (+, +, -, -): N(0) = {0, 1},
    # N(1) = {0, 1}, N(2) = {2, 3}, N(3) = {2, 3}.
    column = torch.tensor([[1.0], [2.0], [-1.0], [-3.0]])
    assert torch.equal(reference.k_reciprocal_mask(column, column, 2), pairs(4, [(0, 1), (2, 3)]))


@pytest.mark.parametrize(
    "args,name",
    [
        (("rows", torch.ones(2, 2), 1), "z_img"),
        ((torch.ones(2, 2), None, 1), "z_aud"),
        ((torch.ones(2), torch.ones(2), 1), "z_img"),
        ((torch.ones(2, 2), torch.ones(2, 2, 1), 1), "z_aud"),
        ((torch.ones(2, 2, dtype=torch.int64), torch.ones(2, 2), 1), "z_img"),
        ((torch.ones(0, 2), torch.ones(0, 2), 1), "z_img"),
        ((torch.ones(2, 0), torch.ones(2, 0), 1), "z_img"),
        ((torch.ones(2, 2), torch.ones(2, 0), 1), "z_aud"),
        ((torch.ones(2, 2), torch.ones(3, 2), 1), "one shape"),
        ((torch.ones(2, 2), torch.ones(2, 2, device="meta"), 1), "one device"),
        ((torch.ones(2, 2), torch.ones(2, 2), 0), "k must"),
        ((torch.ones(2, 2), torch.ones(2, 2), 3), "k must"),
        ((torch.ones(2, 2), torch.ones(2, 2), True), "k must"),
        ((torch.ones(2, 2), torch.ones(2, 2), 1.0), "k must"),
    ],
)
def test_reference_k_reciprocal_rejects_bad_input(args, name):
    with pytest.raises(ValueError, match=name):
        reference.k_reciprocal_mask(*args)


def test_reference_k_reciprocal_rejects_rows_not_finite_in_float32():
    good = torch.ones(3, 2)
    for bad_value in (float("nan"), float("inf"), 1e39):
        bad = torch.ones(3, 2, dtype=torch.float64)
        bad[1, 0] = bad_value
        with pytest.raises(ValueError, match="z_img holds values that are not finite"):
            reference.k_reciprocal_mask(bad, good.double(), 2)
        with pytest.raises(ValueError, match="z_aud holds values that are not finite"):
            reference.mutual_neighbour_mask(good.double(), bad, 2)
    # k = B and k = 1 are valid: all pairs, no pair.
    assert torch.equal(reference.k_reciprocal_mask(good, good, 3), ~torch.eye(3, dtype=torch.bool))
    assert not reference.k_reciprocal_mask(good, good, 1).any()
