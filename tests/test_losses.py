"""The reference losses on hand-computed examples, and their weighting in jsa_loss."""

import dataclasses
import math

import pytest
import torch

from jsa_fast.losses import LossConfig, jsa_loss, target_divergence
from jsa_fast.model import ModelOutput
from jsa_fast.reference import JSAOutput, divergence_loss, info_nce_loss, match_loss, reconstruction_loss


@pytest.mark.numeric
def test_info_nce_orthogonal_pairs():
    # logits = I / tau with tau = 1: every row's CE is -log(e / (e + 1)) = log(1 + 1/e),
    # averaged over B = 2, summed over the two directions.
    p = torch.eye(2)
    expected = 2 * math.log(1 + math.exp(-1))
    torch.testing.assert_close(info_nce_loss(p, p, tau=1.0), torch.tensor(expected))
    torch.testing.assert_close(info_nce_loss(p, p, tau=1.0, directions="mean"), torch.tensor(expected / 2))


@pytest.mark.numeric
def test_info_nce_removes_predicted_false_negatives_from_both_denominators():
    # B = 3, unit vectors; cos(i, j) = 0 for i != j except cos(0, 1) = cos(1, 0) = 0.6 (tau = 1).
    p_img = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    p_aud = p_img.clone()
    e = math.e
    # Row 0: exp(1) / (exp(1) + exp(0.6) + exp(0)); same for row 1; row 2: e / (e + 2).
    full = -(2 * math.log(e / (e + math.exp(0.6) + 1)) + math.log(e / (e + 2))) / 3
    torch.testing.assert_close(info_nce_loss(p_img, p_aud, tau=1.0), torch.tensor(2 * full))
    # Removing the pair (0, 1) drops exp(0.6) from rows 0 and 1: e / (e + 1).
    removed = torch.zeros(3, 3, dtype=torch.bool)
    removed[0, 1] = removed[1, 0] = True
    without = -(2 * math.log(e / (e + 1)) + math.log(e / (e + 2))) / 3
    torch.testing.assert_close(info_nce_loss(p_img, p_aud, tau=1.0, false_negatives=removed), torch.tensor(2 * without))
    # The diagonal is never removed, even when the mask says so.
    with_diagonal = removed | torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(
        info_nce_loss(p_img, p_aud, tau=1.0, false_negatives=with_diagonal), torch.tensor(2 * without)
    )


@pytest.mark.numeric
def test_info_nce_normalises_and_uses_tau():
    p_img = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    p_aud = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    expected = 2 * math.log(1 + math.exp(-1 / 0.03))
    torch.testing.assert_close(info_nce_loss(p_img, p_aud), torch.tensor(expected))


def test_info_nce_bad_arguments():
    with pytest.raises(ValueError, match="directions"):
        info_nce_loss(torch.eye(2), torch.eye(2), directions="max")
    with pytest.raises(ValueError, match="false_negatives"):
        info_nce_loss(torch.eye(2), torch.eye(2), false_negatives=torch.zeros(3, 3, dtype=torch.bool))


@pytest.mark.numeric
def test_match_loss_is_mse_with_stop_gradient():
    ca_img = torch.tensor([[0.5, 0.5]], requires_grad=True)
    ia_img = torch.tensor([[1.0, 0.0]], requires_grad=True)
    ca_aud = torch.tensor([[0.25, 0.75, 0.0]], requires_grad=True)
    ia_aud = torch.tensor([[0.25, 0.25, 0.5]], requires_grad=True)
    # (0.25 + 0.25) / 2 + (0 + 0.25 + 0.25) / 3
    loss = match_loss(ca_img, ia_img, ca_aud, ia_aud)
    torch.testing.assert_close(loss, torch.tensor(0.25 + 0.5 / 3))
    loss.backward()
    assert ia_img.grad is None and ia_aud.grad is None
    torch.testing.assert_close(ca_img.grad, torch.tensor([[-0.5, 0.5]]))


@pytest.mark.numeric
def test_divergence_loss_hand_computed():
    # image: cos(p, r) = 1/sqrt(2) for pair 0, -1 for pair 1 (relu -> 0): mean 1/(2 sqrt 2).
    slots_img = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [-2.0, 0.0]]])
    # audio: cos = 0 and 1: mean 0.5.
    slots_aud = torch.tensor([[[0.0, 3.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 4.0]]])
    expected = 1 / (2 * math.sqrt(2)) + 0.5
    torch.testing.assert_close(divergence_loss(slots_img, slots_aud), torch.tensor(expected))


def test_divergence_loss_one_slot_is_zero():
    assert divergence_loss(torch.randn(2, 1, 4), torch.randn(2, 1, 4)).item() == 0.0


@pytest.mark.numeric
def test_reconstruction_loss_hand_computed_and_detached_targets():
    x_img = torch.zeros(1, 2, 2, requires_grad=True)
    recon_img = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])
    x_aud = torch.ones(1, 1, 2)
    recon_aud = torch.tensor([[[1.0, 3.0]]])
    torch.testing.assert_close(reconstruction_loss(x_img, recon_img, x_aud, recon_aud), torch.tensor(1.0 + 2.0))
    reconstruction_loss(x_img, recon_img.requires_grad_(), x_aud, recon_aud).backward()
    assert x_img.grad is None


def _fake_output(batch=4, dim=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen)
    attn_img, attn_aud = rand(batch, 5, 2), rand(batch, 3, 2)
    return JSAOutput(
        slots_img=torch.randn(batch, 2, dim, generator=gen),
        slots_aud=torch.randn(batch, 2, dim, generator=gen),
        q_img=rand(batch, 2, dim),
        q_aud=rand(batch, 2, dim),
        attn_img=attn_img,
        attn_aud=attn_aud,
        ia_img=attn_img[..., 0],
        ca_img=rand(batch, 5),
        ia_aud=attn_aud[..., 0],
        ca_aud=rand(batch, 3),
    )


def _model_output(jsa, tokens_img, tokens_aud, recon_img, recon_aud):
    """A ModelOutput of one target slot, whose maps are the module's slot-0 maps."""
    return ModelOutput(tokens_img, tokens_aud, jsa, recon_img, recon_aud, jsa.ca_img[..., None], jsa.ca_aud[..., None])


@pytest.mark.numeric
def test_jsa_loss_weights_the_terms():
    out = _fake_output()
    tokens_img, tokens_aud = torch.randn(4, 5, 3), torch.randn(4, 3, 3)
    recon_img, recon_aud = torch.randn(4, 5, 3), torch.randn(4, 3, 3)
    model_out = _model_output(out, tokens_img, tokens_aud, recon_img, recon_aud)
    cfg = LossConfig(k=2, weight_match=100.0, weight_div=0.1, weight_recon=0.1)
    terms = jsa_loss(model_out, cfg)
    expected = terms["loss_ctr"] + 100 * terms["loss_match"] + 0.1 * terms["loss_div"] + 0.1 * terms["loss_recon"]
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["loss_div"], divergence_loss(out.slots_img, out.slots_aud))
    torch.testing.assert_close(terms["loss_recon"], reconstruction_loss(tokens_img, recon_img, tokens_aud, recon_aud))
    torch.testing.assert_close(terms["loss_match"], match_loss(out.ca_img, out.ia_img, out.ca_aud, out.ia_aud))
    no_mitigation = jsa_loss(model_out, LossConfig(k=0))
    torch.testing.assert_close(no_mitigation["loss_ctr"], info_nce_loss(out.slots_img[:, 0], out.slots_aud[:, 0]))
    # With k = B every pair is a mutual neighbour in both modalities: only positives remain.
    everything_removed = jsa_loss(model_out, LossConfig(k=4))
    torch.testing.assert_close(everything_removed["loss_ctr"], torch.tensor(0.0))


def test_loss_config_validation():
    with pytest.raises(ValueError, match="tau"):
        LossConfig(tau=0.0)
    with pytest.raises(ValueError, match="directions"):
        LossConfig(directions="avg")
    with pytest.raises(ValueError, match="k="):
        tokens = (torch.randn(2, 5, 3), torch.randn(2, 3, 3))
        jsa_loss(_model_output(_fake_output(batch=2), *tokens, *tokens), LossConfig(k=20))


# ----------------------------------------------------------------------------------
# Issue #24: jsa_loss against values computed by hand (not against the functions it
# calls), the paper's defaults pinned, the false-negative mask's inputs and use.
# ----------------------------------------------------------------------------------


def _hand_output():
    """B = 2, S = 2 (T = O = 1), d = 2, Lv = La = 2: every term by hand.

    Target slots: image (1, 0), (0, 1) and audio (2, 0), (0, 3) -> p_img = p_aud = I
    after normalisation: logits I / tau; with tau = 1 each row's CE is log(1 + 1/e).
    Off-target slots, for L_div (relu(cos(target, off-target)), mean over the batch):
      image b0 (1, 1): 1/sqrt(2); b1 (0, -3): cos -1 -> 0  -> 1 / (2 sqrt(2))
      audio b0 (4, 0): 1;         b1 (1, 0): 0             -> 1/2
    L_match: ca vs the target slot's column of attn (mean squared error per modality):
      image ca (0.5, 0.5), (1, 0) vs (1, 0), (1, 0): (0.25 + 0.25 + 0 + 0) / 4 = 1/8
      audio ca (0.25, 0.75), (0.5, 0.5) vs (0.25, 0.25), (0.5, 0.5): 0.25 / 4 = 1/16
    L_recon: image tokens 0, recon 1 -> 1; audio tokens 1, recon 1 but one entry of 8
      is 3 -> 4 / 8 = 1/2.
    """
    slots_img = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [0.0, -3.0]]])
    slots_aud = torch.tensor([[[2.0, 0.0], [4.0, 0.0]], [[0.0, 3.0], [1.0, 0.0]]])
    attn_img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    attn_aud = torch.tensor([[[0.25, 0.75], [0.25, 0.75]], [[0.5, 0.5], [0.5, 0.5]]])
    ca_img = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    ca_aud = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    jsa = JSAOutput(
        slots_img, slots_aud, slots_img, slots_aud, attn_img, attn_aud,
        attn_img[..., 0], ca_img, attn_aud[..., 0], ca_aud,
    )  # fmt: skip
    recon_aud = torch.ones(2, 2, 2)
    recon_aud[1, 0, 1] = 3.0
    out = _model_output(jsa, torch.zeros(2, 2, 2), torch.ones(2, 2, 2), torch.ones(2, 2, 2), recon_aud)
    terms = {
        "loss_ctr": 2 * math.log(1 + math.exp(-1)),
        "loss_match": 1 / 8 + 1 / 16,
        "loss_div": 1 / (2 * math.sqrt(2)) + 1 / 2,
        "loss_recon": 1.5,
    }
    return out, terms


# float32 terms of O(1) after a handful of operations each (normalisation, exp/log of
# cross-entropy, a mean of <= 8 squares): within ~10 float32 ulps (1e-6 relative);
# assert_close's float32 default (rtol 1.3e-6, atol 1e-5) covers that, and distinct
# weights of 2, 3 and 5 move the total by >= 0.19.
@pytest.mark.numeric
@pytest.mark.parametrize("directions", ["sum", "mean"])
def test_jsa_loss_hand_computed_terms_and_weights(directions):
    out, expected = _hand_output()
    if directions == "mean":
        expected["loss_ctr"] /= 2
    cfg = LossConfig(tau=1.0, k=0, weight_match=2.0, weight_div=3.0, weight_recon=5.0, directions=directions)
    terms = jsa_loss(out, cfg)
    assert set(terms) == {"loss", "loss_ctr", "loss_match", "loss_div", "loss_recon"}
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], torch.tensor(value), msg=name)
    total = expected["loss_ctr"] + 2 * expected["loss_match"] + 3 * expected["loss_div"] + 5 * expected["loss_recon"]
    torch.testing.assert_close(terms["loss"], torch.tensor(total))
    # The paper's weights (100, 0.1, 0.1) are LossConfig's defaults.
    paper = jsa_loss(out, LossConfig(tau=1.0, k=0, directions=directions))
    paper_total = (
        expected["loss_ctr"] + 100 * expected["loss_match"] + 0.1 * (expected["loss_div"] + expected["loss_recon"])
    )
    torch.testing.assert_close(paper["loss"], torch.tensor(paper_total))


def test_loss_config_defaults_are_the_papers():
    cfg = LossConfig()
    assert (cfg.tau, cfg.k, cfg.weight_match, cfg.weight_div, cfg.weight_recon, cfg.directions) == (
        0.03, 20, 100.0, 0.1, 0.1, "sum",
    )  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 5
    # Zero weights and k = 0 are allowed; negative ones are not.
    zero = LossConfig(k=0, weight_match=0.0, weight_div=0.0, weight_recon=0.0)
    assert (zero.weight_match, zero.weight_div, zero.weight_recon) == (0.0, 0.0, 0.0)
    for field in ("weight_match", "weight_div", "weight_recon", "k", "tau"):
        with pytest.raises(ValueError, match=field):
            LossConfig(**{field: -1})


@pytest.mark.numeric
def test_jsa_loss_false_negative_mask_gets_detached_targets_and_is_applied():
    # The mask op sees the target representations (normalised target slots), detached,
    # and k; what it returns leaves both denominators (info_nce_loss's own test). k = 1
    # is mitigation too.
    out, _ = _hand_output()
    calls = []

    def fixed_mask(z_img, z_aud, k):
        calls.append((z_img, z_aud, k))
        return torch.tensor([[False, True], [True, False]])

    for k in (1, 2):
        terms = jsa_loss(out, LossConfig(tau=1.0, k=k), false_negative_mask=fixed_mask)
        # Each row keeps only its positive: CE = 0 in both directions.
        torch.testing.assert_close(terms["loss_ctr"], torch.tensor(0.0))
        z_img, z_aud, seen_k = calls[-1]
        assert seen_k == k and not z_img.requires_grad and not z_aud.requires_grad
        torch.testing.assert_close(z_img, torch.eye(2))
        torch.testing.assert_close(z_aud, torch.eye(2))
    slots_img, slots_aud = out.jsa.slots_img.clone().requires_grad_(), out.jsa.slots_aud.clone().requires_grad_()
    with_grad = out._replace(jsa=out.jsa._replace(slots_img=slots_img, slots_aud=slots_aud))
    jsa_loss(with_grad, LossConfig(tau=1.0, k=1), false_negative_mask=fixed_mask)["loss"].backward()
    assert not calls[-1][0].requires_grad and not calls[-1][1].requires_grad
    assert slots_img.grad is not None and slots_aud.grad is not None


def test_a_target_slot_that_is_not_finite_gives_a_non_finite_loss_not_an_error():
    # The default mask op skips its finiteness check (a device sync on CUDA): the NaN
    # reaches the loss, which training detects; the op would raise if it checked.
    out = _fake_output()
    out = out._replace(slots_img=out.slots_img.clone().index_fill_(0, torch.tensor([1]), float("nan")))
    model_out = _model_output(out, *(torch.randn(4, length, 3) for length in (5, 3, 5, 3)))
    terms = jsa_loss(model_out, LossConfig(k=2))
    assert not torch.isfinite(terms["loss_ctr"]) and not torch.isfinite(terms["loss"])
    assert torch.isfinite(terms["loss_recon"])


@pytest.mark.numeric
def test_jsa_loss_gathers_the_contrastive_term_over_the_global_batch():
    # Slots padded to d = 3; gather appends a third pair, orthogonal to the others, to both
    # modalities (as other processes would): the contrastive term is then over B = 3 (each
    # row's CE log(1 + 2/e)), the other terms stay local.
    out, expected = _hand_output()
    extra = torch.tensor([[0.0, 0.0, 1.0]])
    gather = lambda p: torch.cat([p, extra])
    padded = out._replace(
        jsa=out.jsa._replace(
            slots_img=torch.nn.functional.pad(out.jsa.slots_img, (0, 1)),
            slots_aud=torch.nn.functional.pad(out.jsa.slots_aud, (0, 1)),
        )
    )
    terms = jsa_loss(padded, LossConfig(tau=1.0, k=0), gather=gather)
    torch.testing.assert_close(terms["loss_ctr"], torch.tensor(2 * math.log(1 + 2 * math.exp(-1))))
    torch.testing.assert_close(terms["loss_div"], torch.tensor(expected["loss_div"]))


@pytest.mark.numeric
def test_target_divergence_over_target_off_target_pairs():
    # S = 4 slots, T = 2 targets, O = 2 off-target, d = 2; lengths other than 1 to be
    # normalised. b0: targets (5, 0), (0, 1); off-target (3, 3), (-2, 0):
    # cos: (0, 2) 1/sqrt(2), (0, 3) -1 -> 0, (1, 2) 1/sqrt(2), (1, 3) 0 -> sum sqrt(2).
    # b1: targets (0, 2), (0, 1); off-target (0, -1), (1, 0): all <= 0 -> 0.
    # Mean over 2 x 2 x 2 = 8: sqrt(2) / 8.
    slots = torch.tensor(
        [[[5.0, 0.0], [0.0, 1.0], [3.0, 3.0], [-2.0, 0.0]], [[0.0, 2.0], [0.0, 1.0], [0.0, -1.0], [1.0, 0.0]]]
    )
    torch.testing.assert_close(target_divergence(slots, 2), torch.tensor(math.sqrt(2) / 8))
    # T = 1: pairs (0, 1..3): b0 0, 1/sqrt(2), 0 (relu of -1); b1: 1 (same direction), 0, 0.
    torch.testing.assert_close(target_divergence(slots, 1), torch.tensor((1 / math.sqrt(2) + 1) / 6))
    # T = 3: pairs (0..2, 3): b0 0, 0, 0; b1 0, 0, 0 ((0, -1) . (1, 0) = 0).
    assert target_divergence(slots, 3).item() == 0.0
    for targets in (0, 4, -1):
        with pytest.raises(ValueError, match="targets"):
            target_divergence(slots, targets)
    with pytest.raises(ValueError, match="targets"):
        target_divergence(torch.randn(2, 2, 3), 2)  # S = 2 < d = 3: T = S leaves no off-target


@pytest.mark.numeric
def test_reconstruction_loss_detaches_both_targets():
    x_img, x_aud = torch.zeros(1, 2, 2, requires_grad=True), torch.zeros(1, 1, 2, requires_grad=True)
    recon_img, recon_aud = torch.ones(1, 2, 2, requires_grad=True), torch.ones(1, 1, 2, requires_grad=True)
    loss = reconstruction_loss(x_img, recon_img, x_aud, recon_aud)
    torch.testing.assert_close(loss, torch.tensor(2.0))
    loss.backward()
    assert x_img.grad is None and x_aud.grad is None
    # d/d recon of mean((recon - x)^2) = 2 (recon - x) / n: 2 / 4 and 2 / 2.
    torch.testing.assert_close(recon_img.grad, torch.full((1, 2, 2), 0.5))
    torch.testing.assert_close(recon_aud.grad, torch.full((1, 1, 2), 1.0))
