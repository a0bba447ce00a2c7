"""The reference JointSlotAttention against hand-checkable cases and the docs/api.md contract."""

import math

import pytest
import torch

from jsa_fast import FusedJointSlotAttention, JointSlotAttention
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
