"""The reference losses on hand-computed examples, and their weighting in jsa_loss."""

import math

import pytest
import torch

from jsa_fast.losses import LossConfig, jsa_loss
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
