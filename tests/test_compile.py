"""torch.compile of the full training objective (encoders, JSA, decoders, losses), and the
--compile switch."""

import argparse
import copy

import pytest
import torch
from test_train import MICRO

from jsa_fast.config import PRESETS, add_config_arguments, config_from_args, saved_config
from jsa_fast.model import JSAModel
from jsa_fast.train import loss_function, token_masks, train


def _inputs(cfg):
    torch.manual_seed(1)
    model_cfg = cfg.model
    image = torch.randn(4, 3, model_cfg.image_size, model_cfg.image_size)
    spec = torch.randn(4, 1, model_cfg.spec_bins, model_cfg.spec_frames)
    return (image, spec, *token_masks(model_cfg, 4, seed=0, step=0))


def test_the_whole_objective_compiles_as_one_graph():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward as
    inductor would, without its (slow on CPU) code generation."""
    cfg = MICRO.overridden(mask_prob=0.5)
    torch.manual_seed(0)
    eager_model = JSAModel(cfg.model)
    compiled_model = copy.deepcopy(eager_model)
    inputs = _inputs(cfg)
    torch._dynamo.reset()
    compiled = torch.compile(loss_function(compiled_model, cfg), fullgraph=True, backend="aot_eager")
    expected, terms = loss_function(eager_model, cfg)(*inputs), compiled(*inputs)
    expected["loss"].backward()
    terms["loss"].backward()
    assert terms.keys() == expected.keys()
    for name in terms:
        torch.testing.assert_close(terms[name], expected[name], rtol=1e-5, atol=1e-6)
    for (name, reference), parameter in zip(eager_model.named_parameters(), compiled_model.parameters()):
        atol = max(1e-7, 1e-5 * float(reference.grad.abs().max()))
        torch.testing.assert_close(
            parameter.grad, reference.grad, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_compile_flag_and_preset_defaults():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert (PRESETS["paper"].optim.compile, PRESETS["tiny"].optim.compile) == ("default", "none")
    given = {
        ("--preset", "tiny", "--compile"): "default",
        ("--no-compile",): "none",
        ("--compile", "false"): "none",
        ("--compile", "yes"): "default",
        ("--compile", "reduce-overhead"): "reduce-overhead",
    }
    for flags, mode in given.items():
        assert config_from_args(parser.parse_args(list(flags)), "paper").optim.compile == mode, flags
    assert config_from_args(parser.parse_args(["--augment", "flip"]), "paper").data.image.augment == "flip"
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile", "maybe"])


def test_a_checkpoint_of_the_boolean_compile_reads_as_its_mode():
    """Before the modes, compile was a bool: nested and flat checkpoints keep their meaning."""
    for stored, mode in ((True, "default"), (False, "none")):
        nested = PRESETS["tiny"].to_dict()
        nested["optim"]["compile"] = stored
        assert saved_config(nested, "old.pt").optim.compile == mode
        flat = {"compile": stored, "dim": 32}
        assert saved_config(flat, "old.pt").optim.compile == mode


@pytest.mark.slow
def test_compiled_training_matches_eager(world, tmp_path):
    """Inductor on the CPU: minutes of compilation on a 2-core machine."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    means = train(MICRO.overridden(epochs=1), str(world), eager, torch.device("cpu"))
    compiled_means = train(MICRO.overridden(epochs=1, compile="default"), str(world), compiled, torch.device("cpu"))
    assert compiled_means == pytest.approx(means, rel=1e-4)
