"""Encoders, decoders and the full model: shapes, parameter counts, checkpoints, localize."""

import hashlib

import pytest
import torch
from torchvision.models import resnet18

from jsa_fast.decoders import SlotDecoder
from jsa_fast.encoders import AudioEncoder, ImageEncoder, ResNet18Trunk, resnet_output_size
from jsa_fast.losses import LossConfig, jsa_loss
from jsa_fast.model import JSAModel, ModelConfig, count_parameters


@pytest.mark.parametrize("size,tokens", [(224, 7), (257, 9), (501, 16), (160, 5), (64, 2), (32, 1)])
def test_resnet_output_size(size, tokens):
    assert resnet_output_size(size) == tokens


def test_trunk_is_torchvision_resnet18():
    trunk, reference = ResNet18Trunk(3, 64), resnet18()
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in trunk.state_dict().items()} == expected


def test_paper_token_shapes():
    torch.manual_seed(0)
    image_encoder, audio_encoder = ImageEncoder().eval(), AudioEncoder().eval()
    with torch.no_grad():
        assert image_encoder(torch.randn(1, 3, 224, 224)).shape == (1, 49, 512)
        assert audio_encoder(torch.randn(1, 1, 257, 501)).shape == (1, 16, 512)


def test_token_counts_follow_input_sizes():
    image_encoder, audio_encoder = ImageEncoder(dim=32, base_width=8), AudioEncoder(dim=32, base_width=8)
    assert image_encoder(torch.randn(2, 3, 160, 96)).shape == (2, 5 * 3, 32)
    assert audio_encoder(torch.randn(2, 1, 65, 201)).shape == (2, 7, 32)


def test_audio_tokens_are_max_over_frequency():
    encoder = AudioEncoder(dim=16, base_width=8).eval()
    spec = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        feature_map = encoder.proj(encoder.trunk(spec))  # B x d x F' x T'
        torch.testing.assert_close(encoder(spec), feature_map.amax(dim=2).transpose(1, 2))


def test_a_torchvision_resnet18_state_dict_loads_into_the_image_encoder_whole(tmp_path):
    # The layout of torchvision's IMAGENET1K_V1 file (resnet18-f37072fd.pth), random weights.
    torch.manual_seed(0)
    state = resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = JSAModel(ModelConfig(pretrained_image=str(path)))
    loaded = model.state_dict()
    used = [name for name in state if f"image_encoder.trunk.{name}" in loaded]
    # Every tensor under its own name, BatchNorm statistics and counters included; only
    # ImageNet's classifier has no place in the encoder, and is reported as unused.
    assert sorted(set(state) - set(used)) == ["fc.bias", "fc.weight"]
    for name in used:
        assert torch.equal(loaded[f"image_encoder.trunk.{name}"], state[name]), name
    assert len(used) == len([name for name in loaded if name.startswith("image_encoder.trunk.")]) == 120
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.image_encoder.started_from == {
        "weights": str(path),
        "sha256": digest,
        "tensors": 120,
        "unused": ["fc.bias", "fc.weight"],
    }
    assert model.audio_encoder.started_from == {"weights": "random"}


def test_pretrained_files_that_do_not_fit_are_named(tmp_path):
    torch.manual_seed(0)
    state = resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    audio_encoder = AudioEncoder(pretrained=path)  # 1 channel: conv1 summed over RGB
    torch.testing.assert_close(audio_encoder.trunk.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="pretrained"):
        ImageEncoder(base_width=8, pretrained=path)
    torch.save({**state, "layer5.0.conv1.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="layer5.0.conv1.weight"):  # a tensor left over is not skipped
        ImageEncoder(pretrained=tmp_path / "extra.pth")
    torch.save({k: v for k, v in state.items() if k != "bn1.running_var"}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="bn1.running_var"):
        ImageEncoder(pretrained=tmp_path / "short.pth")


def test_projection_is_initialised_kaiming_normal_fan_out():
    # The released resnet.py: kaiming_normal_(mode="fan_out", nonlinearity="relu") on every
    # Conv2d, the 1x1 projection included: std sqrt(2 / fan_out) = sqrt(2 / 512).
    torch.manual_seed(0)
    for encoder in (ImageEncoder(), AudioEncoder()):
        weight = encoder.proj.weight.detach()
        assert weight.shape == (512, 512, 1, 1)
        assert float(weight.std()) == pytest.approx((2 / 512) ** 0.5, rel=0.01)
        assert abs(float(weight.mean())) < 1e-3
        assert (
            float(weight.abs().max()) > 3.5 * (2 / 512) ** 0.5
        )  # normal, not uniform: tails beyond the std's few multiples


def test_encoder_bad_input():
    with pytest.raises(ValueError, match="image"):
        ImageEncoder(dim=8, base_width=4)(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="spec"):
        AudioEncoder(dim=8, base_width=4)(torch.randn(1, 32, 32))


def test_decoder_parameter_counts_match_the_paper():
    # MLP: 3 x (512 x 512 + 512) + 512 x 513 + 513 = 1,051,137; position embeddings
    # 7 x 256 x 2 = 3,584 (image), (1 + 16) x 256 = 4,352 (audio).
    image_decoder, audio_decoder = SlotDecoder(7, 7, 512), SlotDecoder(1, 16, 512)
    assert count_parameters(image_decoder) == 1_054_721
    assert count_parameters(audio_decoder) == 1_055_489
    # The paper's "1.05 M each" truncates: 1.0547 M and 1.0555 M (the released code's sizes).
    assert count_parameters(image_decoder) // 10_000 == count_parameters(audio_decoder) // 10_000 == 105


def test_decoder_is_a_softmax_mixture_over_slots():
    decoder = SlotDecoder(2, 3, dim=8)
    slots = torch.randn(4, 2, 8)
    recon = decoder(slots)
    assert recon.shape == (4, 6, 8)
    # Identical slots: the mixture weights are 1/2 each, so the output is that slot's feature.
    same = slots[:, :1].expand(-1, 2, -1)
    decoded = decoder.mlp(same[:, :1].unsqueeze(2) + decoder.position_embedding())[:, 0, :, :-1]
    torch.testing.assert_close(decoder(same), decoded)
    # Position embedding: row-major grid, [column, row] halves.
    pos = decoder.position_embedding()
    torch.testing.assert_close(pos[4], torch.cat([decoder.col_embed.weight[1], decoder.row_embed.weight[1]]))


def tiny_config(**overrides):
    values = dict(dim=32, mlp_hidden=64, image_size=64, spec_bins=33, spec_frames=64, encoder_width=8)
    values.update(overrides)
    return ModelConfig(**values)


def test_model_forward_and_loss_backward():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = JSAModel(cfg)
    image, spec = torch.randn(4, 3, 64, 64), torch.randn(4, 1, 33, 64)
    out = model(image, spec)
    assert out.tokens_img.shape == out.recon_img.shape == (4, 4, 32)
    assert out.tokens_aud.shape == out.recon_aud.shape == (4, 2, 32)
    terms = jsa_loss(out, LossConfig(k=2))
    assert set(terms) == {"loss", "loss_ctr", "loss_match", "loss_div", "loss_recon"}
    terms["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # The mask tokens get gradient only when a token was masked in this batch.
    assert set(missing) <= {"jsa.image.mask_token", "jsa.audio.mask_token"}


def test_localize_returns_normalised_maps_at_image_resolution():
    torch.manual_seed(0)
    model = JSAModel(tiny_config(image_size=96)).eval()
    image, spec = torch.randn(2, 3, 96, 96), torch.randn(2, 1, 33, 64)
    with torch.no_grad():
        ca, iqr = model.localize(image, spec, alpha=0.6)
        only_ca = model.localize(image, spec, alpha=1.0)[1]
        out = model(image, spec)
    assert ca.shape == iqr.shape == (2, 96, 96)
    for m in (ca, iqr):
        assert m.amin(dim=(1, 2)).eq(0).all() and m.amax(dim=(1, 2)).eq(1).all()
    torch.testing.assert_close(only_ca, ca)
    # The map is the upsampled ca^{a,v}: a bilinear interpolant peaks at a grid node, so
    # the brightest pixel sits at the brightest of the 3 x 3 cells (nodes 47.5 px apart).
    cells = out.jsa.ca_img.reshape(2, 3, 3)
    for b in range(2):
        row, col = divmod(int(ca[b].argmax()), 96)
        assert (round(row / 47.5), round(col / 47.5)) == divmod(int(cells[b].argmax()), 3)
    with pytest.raises(ValueError, match="alpha"):
        model.localize(image, spec, alpha=1.5)
