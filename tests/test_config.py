"""The nested run configuration: one owner per default, the flags made from it, and the
checkpoints written before it (a flat dict of settings) still loaded, resumed and evaluated."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train import MICRO

import jsa_fast
from jsa_fast.checkpoint import load_checkpoint, save_checkpoint
from jsa_fast.config import PRESETS, SETTINGS, RunConfig, config_from_args, saved_config
from jsa_fast.errors import DataError, UsageError
from jsa_fast.evaluate import main as evaluate_main
from jsa_fast.train import build_parser, main as train_main, train

# The settings of the flat RunConfig that checkpoints held before the nested configs, as
# `dataclasses.asdict` wrote them: one key per flag.
FLAT_FIELDS = (
    "dim targets off_targets iters mlp_hidden mask_prob encoder_width backend pretrained_image pretrained_audio "
    "image_size train_resize augment audio_seconds n_fft win_length hop_length tau k weight_match weight_div "
    "weight_recon directions epochs batch_size lr weight_decay amp compile num_workers seed val val_fraction "
    "log_every synth_train synth_test synth_classes synth_seed synth_image_size synth_audio_seconds"
).split()


def test_every_flat_setting_is_a_flag_of_the_nested_config():
    assert set(SETTINGS) == set(FLAT_FIELDS)
    parser = build_parser()
    flags = {option: action for action in parser._actions for option in action.option_strings}
    for name in SETTINGS:
        flag = flags[f"--{name.replace('_', '-')}"]
        assert flag.dest == name and "default" in flag.help, name  # every flag says what it is, and its defaults
    assert flags["--amp"].metavar == "{bf16,fp16,none}" and flags["--backend"].metavar == "{auto,triton,torch}"
    assert flags["--directions"].metavar == "{sum,mean}" and flags["--augment"].metavar == "{released,flip,none}"
    assert "128 (tiny)" in flags["--mlp-hidden"].help and "1024 (paper)" in flags["--mlp-hidden"].help
    assert flags["--pretrained"] is flags["--pretrained-image"] and flags["--no-compile"].dest == "compile"
    args = [
        "--synth-train",
        "7",
        "--image-size",
        "96",
        "--audio-seconds",
        "1.5",
        "--pretrained",
        "w.pth",
        "--mlp-hidden",
        "48",
        "--no-compile",
    ]
    cfg = config_from_args(parser.parse_args(args), "paper")
    assert (cfg.synth.n_train, cfg.data.image.size, cfg.data.audio.seconds) == (7, 96, 1.5)
    assert (cfg.optim.pretrained_image, cfg.model.mlp_hidden, cfg.optim.compile) == ("w.pth", 48, "none")
    # what the run derives follows: the model's input sizes, the spectrogram masks
    assert (cfg.model.image_size, cfg.model.spec_frames) == (96, cfg.data.audio.spectrogram_shape[2])
    assert cfg.model.pretrained_image is None and cfg.starting_model().pretrained_image == "w.pth"
    assert PRESETS["paper"].data.audio.spec_augment and not PRESETS["tiny"].data.audio.spec_augment


def test_overrides_are_range_checked_by_flag_name():
    with pytest.raises(UsageError, match=r"^--mlp-hidden must be an integer >= 1, got 0$"):
        PRESETS["tiny"].overridden(mlp_hidden=0)
    with pytest.raises(UsageError, match=r"--train-resize \(50\) must be >= --image-size \(64\)"):
        MICRO.overridden(train_resize=50)
    with pytest.raises(ValueError, match="unknown settings"):
        MICRO.overridden(mlp_width=8)


def test_nested_checkpoint_config_round_trips_and_names_unknown_settings():
    for cfg in (*PRESETS.values(), MICRO):
        assert saved_config(cfg.to_dict(), "last.pt") == cfg
    stored = MICRO.to_dict()
    stored["model"]["width"] = 3
    with pytest.raises(DataError, match=r"unknown here, \['model.width'\]"):
        saved_config(stored, "last.pt")
    broken = MICRO.to_dict()
    broken["optim"]["lr"] = -1.0
    with pytest.raises(DataError, match="not valid: --lr must be a finite number > 0, got -1.0"):
        saved_config(broken, "last.pt")


def flat_config(cfg: RunConfig) -> dict:
    """The configuration as versions before the nested configs stored it."""
    flat = cfg.settings()
    assert set(flat) == set(FLAT_FIELDS)
    return flat


def test_a_checkpoint_written_before_the_nested_configs_loads_resumes_and_evaluates(world, tmp_path):
    """The flat config migrates to the run's own configuration, so the resume is the exact
    one test_train checks (test_resume_continues_exactly)."""
    old = tmp_path / "old"
    train(MICRO.overridden(epochs=1), str(world), old, torch.device("cpu"))
    state = load_checkpoint(old / "last.pt")
    state["config"] = flat_config(MICRO.overridden(epochs=1))
    save_checkpoint(state, old / "last.pt")

    assert saved_config(load_checkpoint(old / "last.pt")["config"], "last.pt") == MICRO.overridden(epochs=1)
    assert (
        evaluate_main(["--checkpoint", str(old / "last.pt"), "--out", str(tmp_path / "eval"), "--num-workers", "0"])
        == 0
    )
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["n"] == 6
    assert train_main(["--out", str(old), "--resume", "--epochs", "2", "--data", str(world)]) == 0
    resumed = load_checkpoint(old / "last.pt")
    assert (resumed["epoch"], resumed["step"]) == (2, 4)
    assert resumed["config"] == MICRO.to_dict()  # written nested from then on


def test_a_default_changed_in_its_one_place_reaches_the_flags_the_module_and_the_checkpoint(world, tmp_path):
    """Edit the MLP width where it is defined (jsa_fast/reference.py) in a copy of the
    package: the paper preset's flag default, the modules built and the checkpoint a
    run writes all carry the new width."""
    package = Path(jsa_fast.__file__).parent
    copy = tmp_path / "src" / "jsa_fast"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    reference = copy / "reference.py"
    source = reference.read_text()
    assert source.count("MLP_HIDDEN = 1024\n") == 1 and source.count("1024") == 1  # the one place
    reference.write_text(source.replace("MLP_HIDDEN = 1024\n", "MLP_HIDDEN = 96\n"))
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import json, torch
        import jsa_fast
        from jsa_fast.config import PRESETS, config_from_args
        from jsa_fast.fused import FusedJointSlotAttention
        from jsa_fast.model import JSAModel
        from jsa_fast.reference import JointSlotAttention
        from jsa_fast.train import build_parser, main
        assert jsa_fast.__file__.startswith({str(copy)!r}), jsa_fast.__file__
        flags = ["--preset", "paper", "--dim", "16", "--encoder-width", "4", "--image-size", "64", "--train-resize", "72",
                 "--audio-seconds", "0.5", "--n-fft", "64", "--win-length", "64", "--k", "2", "--batch-size", "4",
                 "--epochs", "1", "--num-workers", "0", "--amp", "none", "--no-compile", "--pretrained", "none"]
        parser = build_parser()
        help_text = next(a.help for a in parser._actions if a.dest == "mlp_hidden")
        cfg = config_from_args(parser.parse_args(flags), "paper")
        model = JSAModel(cfg.model)
        main(["--data", {str(world)!r}, "--out", {str(out)!r}, *flags])
        state = torch.load({str(out / "last.pt")!r}, weights_only=True)
        print(json.dumps({{
            "help": help_text, "preset": PRESETS["paper"].model.mlp_hidden, "parsed": cfg.model.mlp_hidden,
            "module": model.jsa.image.mlp[0].out_features, "reference": JointSlotAttention().mlp_hidden,
            "fused": FusedJointSlotAttention().mlp_hidden,
            "checkpoint": state["config"]["model"]["mlp_hidden"], "weights": state["model"]["jsa.image.mlp.0.weight"].shape[0],
        }}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path / "src", capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert "96 (paper)" in seen["help"] and "128 (tiny)" in seen.pop("help")  # the tiny preset overrides it
    assert seen == dict.fromkeys(("preset", "parsed", "module", "reference", "fused", "checkpoint", "weights"), 96)


def test_a_setting_added_in_one_place_has_its_flag_help_check_and_checkpoint_round_trip(tmp_path):
    """Declare a new setting on LossConfig (jsa_fast/losses.py) in a copy of the package,
    and nothing else: it becomes a flag with its help and default, its range is checked
    in the flag's words, a run's configuration stores it and reads it back, and a
    checkpoint written before it existed takes its default."""
    package = Path(jsa_fast.__file__).parent
    copy = tmp_path / "src" / "jsa_fast"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    losses = copy / "losses.py"
    source = losses.read_text()
    anchor = "\n    def __post_init__(self) -> None:\n        check_fields(self)\n"
    assert source.count(anchor) == 1
    declaration = '    weight_extra: float = setting(0.5, "weight of an extra term", number(0))\n'
    losses.write_text(source.replace(anchor, declaration + anchor))
    script = textwrap.dedent(
        f"""
        import json
        import jsa_fast
        from jsa_fast.config import PRESETS, config_from_args, saved_config
        from jsa_fast.errors import UsageError
        from jsa_fast.train import build_parser
        assert jsa_fast.__file__.startswith({str(copy)!r}), jsa_fast.__file__
        parser = build_parser()
        action = next(a for a in parser._actions if a.dest == "weight_extra")
        cfg = config_from_args(parser.parse_args(["--weight-extra", "2"]), "tiny")
        try:
            config_from_args(parser.parse_args(["--weight-extra", "-1"]), "tiny")
            refused = None
        except UsageError as error:
            refused = str(error)
        stored = cfg.to_dict()
        older = PRESETS["tiny"].to_dict()
        del older["loss"]["weight_extra"]
        print(json.dumps({{
            "flags": action.option_strings, "help": action.help, "parsed": cfg.loss.weight_extra,
            "refused": refused, "stored": stored["loss"]["weight_extra"],
            "round_trip": saved_config(stored, "last.pt") == cfg,
            "older": saved_config(older, "old.pt").loss.weight_extra,
        }}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path / "src", capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {
        "flags": ["--weight-extra"],
        "help": "weight of an extra term [default 0.5]",
        "parsed": 2.0,
        "refused": "--weight-extra must be a finite number >= 0, got -1.0",
        "stored": 2.0,
        "round_trip": True,
        "older": 0.5,
    }
