"""Run configuration: nested configs, the presets, and the command-line flags made from them.

A run (`RunConfig`) is the architecture (`ModelConfig`), the loss (`LossConfig`), the
preprocessing (`DataConfig`: `ImageConfig` and `AudioConfig`), the optimisation
(`OptimConfig`) and the bundled synthetic world (`SynthConfig`). Each default is written once,
in the config class that owns it; the presets are overrides of those defaults.

Every setting is a flag `--setting-name VALUE` (`SETTINGS` maps each name to its place in
the nested config; a boolean also takes `--setting-name` alone and `--no-setting-name`).
What a run derives (the model's input sizes from the preprocessing, the spectrogram masks
from --augment) is no setting of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from jsa_fast.cli import DataError, UsageError
from jsa_fast.data.audio import AudioConfig
from jsa_fast.data.image import AUGMENTS, ImageConfig
from jsa_fast.data.synth import ensure_synthetic_dataset
from jsa_fast.encoders import IMAGENET_WEIGHTS
from jsa_fast.fused import BACKENDS
from jsa_fast.losses import DIRECTIONS, LossConfig
from jsa_fast.model import ModelConfig
from jsa_fast.runtime import AMP_DTYPES

__all__ = [
    "RunConfig",
    "DataConfig",
    "OptimConfig",
    "SynthConfig",
    "SETTINGS",
    "PRESETS",
    "add_config_arguments",
    "config_from_args",
    "given_overrides",
    "saved_config",
    "released_epochs",
]


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing: the frame's (`image`) and the clip's (`audio`). The clip's spectrogram
    masks follow image.augment ("released" masks them, as the released code's hard_aud)."""

    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)

    def __post_init__(self) -> None:
        spec_augment = self.image.augment == "released"
        if self.audio.spec_augment != spec_augment:
            object.__setattr__(self, "audio", dataclasses.replace(self.audio, spec_augment=spec_augment))


@dataclass(frozen=True)
class OptimConfig:
    """How the model is trained and selected; defaults are the released recipe's."""

    # None: by the training set's size (`released_epochs`)
    epochs: int | None = None
    batch_size: int = 256  # the global batch: pairs per optimiser step over all processes
    lr: float = 5e-5
    weight_decay: float = 0.01
    amp: str = "fp16"
    compile: bool = True
    num_workers: int = 8
    seed: int = 0
    # The encoders' start: None not chosen (training refuses to start), "none" random
    # weights, else a local torchvision ResNet-18 state dict.
    pretrained_image: str | None = None
    pretrained_audio: str | None = None
    # model selection: best.pt by validation AP50 on `val` (VGG-SS style JSON of ids in
    # --data), or by validation loss on `val_fraction` of train.txt (no boxes there)
    val: str | None = None
    val_fraction: float = 0.0
    log_every: int = 10


def _synth_default(name: str) -> Any:
    return inspect.signature(ensure_synthetic_dataset).parameters[name].default


@dataclass(frozen=True)
class SynthConfig:
    """The bundled synthetic world, used when no --data is given: the arguments of
    `jsa_fast.data.synth.ensure_synthetic_dataset`, whose defaults these are."""

    n_train: int = _synth_default("n_train")
    n_test: int = _synth_default("n_test")
    seed: int = _synth_default("seed")
    image_size: int = _synth_default("image_size")
    audio_seconds: float = _synth_default("audio_seconds")
    num_classes: int = _synth_default("num_classes")


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; the defaults are the `paper` preset (docs/model.md).

    model: the architecture, its input sizes (image_size, spec_bins, spec_frames) derived
    from `data` and its pretrained files left None (a trained model's weights come from
    its checkpoint; `starting_model` names the files training starts from).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)

    def __post_init__(self) -> None:
        _, bins, frames = self.data.audio.spectrogram_shape
        derived = {"image_size": self.data.image.size, "spec_bins": bins, "spec_frames": frames}
        derived |= {"pretrained_image": None, "pretrained_audio": None}
        object.__setattr__(self, "model", dataclasses.replace(self.model, **derived))
        check_settings(self.settings())

    def settings(self) -> dict[str, Any]:
        """Every setting's value, by its name in `SETTINGS`."""
        return {name: _get(self, path) for name, path in SETTINGS.items()}

    def overridden(self, **changes: Any) -> RunConfig:
        """This configuration with the named settings (`SETTINGS` names) changed: UsageError
        naming each flag whose value is out of range, ValueError for an unknown name."""
        unknown = sorted(set(changes) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; known: {sorted(SETTINGS)}")
        values = self.settings() | changes
        check_settings(values)  # before the sub-configs check their own fields, in their own words
        return _replaced(self, (), values)

    def starting_model(self) -> ModelConfig:
        """The architecture with the pretrained files its encoders load when built
        (training's start; evaluation builds `model` and loads a checkpoint's weights)."""
        return dataclasses.replace(
            self.model,
            pretrained_image=_weights_file(self.optim.pretrained_image),
            pretrained_audio=_weights_file(self.optim.pretrained_audio),
        )

    def to_dict(self) -> dict[str, Any]:
        """The nested configuration as plain values, as checkpoints store it (`saved_config`)."""
        return dataclasses.asdict(self)


def _sections(cls: type, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dataclasses.Field]]:
    """(path, field) of every leaf field of the config class `cls`, depth first."""
    for option in dataclasses.fields(cls):
        factory = option.default_factory
        if dataclasses.is_dataclass(factory):
            yield from _sections(factory, (*path, option.name))  # type: ignore[arg-type]
        else:
            yield (*path, option.name), option


# Leaves that are no setting: derived by the run, or fixed.
_NOT_SETTINGS = {
    ("model", "image_size"), ("model", "spec_bins"), ("model", "spec_frames"), ("model", "eps"),
    ("model", "pretrained_image"), ("model", "pretrained_audio"),
    ("data", "audio", "sample_rate"), ("data", "audio", "spec_augment"),
}  # fmt: skip
# A setting is named by its field, except these (and the synthetic world's, prefixed "synth_").
_RENAMED = {
    ("data", "image", "size"): "image_size",
    ("data", "audio", "seconds"): "audio_seconds",
    ("synth", "n_train"): "synth_train",
    ("synth", "n_test"): "synth_test",
    ("synth", "num_classes"): "synth_classes",
}


def _setting_name(path: tuple[str, ...]) -> str:
    if path in _RENAMED:
        return _RENAMED[path]
    return f"synth_{path[-1]}" if path[0] == "synth" else path[-1]


# setting name -> its path in RunConfig, e.g. "mlp_hidden" -> ("model", "mlp_hidden")
SETTINGS: dict[str, tuple[str, ...]] = {
    _setting_name(path): path for path, _ in _sections(RunConfig) if path not in _NOT_SETTINGS
}
_FIELDS = {name: option for path, option in _sections(RunConfig) for name in [_setting_name(path)] if name in SETTINGS}
assert len(SETTINGS) == len({path for path, _ in _sections(RunConfig)} - _NOT_SETTINGS), "two settings share a name"


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def _replaced(config: Any, path: tuple[str, ...], values: Mapping[str, Any]) -> Any:
    """`config` (a config at `path` of RunConfig) with the setting values of `values`."""
    changes = {}
    for option in dataclasses.fields(config):
        place = (*path, option.name)
        if dataclasses.is_dataclass(option.default_factory):
            changes[option.name] = _replaced(getattr(config, option.name), place, values)
        elif place not in _NOT_SETTINGS:
            changes[option.name] = values[_setting_name(place)]
    return dataclasses.replace(config, **changes)


def _weights_file(choice: str | None) -> str | None:
    """A pretrained choice as ModelConfig takes it: a path, or None for random weights."""
    return None if choice in (None, "none") else choice


def released_epochs(items: int) -> int:
    """Epochs for a training set of `items` when --epochs is not given: the released
    train_script.sh trains 100 epochs on the 10k subsets and 50 on VGGSound-144k; a size in
    between takes the nearer of the two on a log scale (100 below 38,000 items, about
    sqrt(10k x 144k))."""
    return 100 if items < 38_000 else 50


PRETRAINED_HINT = (
    f"--pretrained: choose the image encoder's start: the paper fine-tunes torchvision's ImageNet ResNet-18 "
    f"(ResNet18_Weights.IMAGENET1K_V1, the file {IMAGENET_WEIGHTS}; nothing is downloaded here): "
    f"--pretrained PATH/{IMAGENET_WEIGHTS}, or --pretrained none for random weights"
)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Settings with a fixed set of values: each is a flag's choices and its range check.
CHOICES: dict[str, tuple[str, ...]] = {
    "backend": BACKENDS,
    "amp": tuple(AMP_DTYPES),
    "directions": DIRECTIONS,
    "augment": AUGMENTS,
}

# setting -> (what it must be, the check)
_CHECKS: dict[str, tuple[str, Any]] = {
    **dict.fromkeys(
        (
            "dim",
            "iters",
            "mlp_hidden",
            "encoder_width",
            "image_size",
            "train_resize",
            "n_fft",
            "win_length",
            "hop_length",
            "batch_size",
            "log_every",
            "synth_train",
            "synth_test",
            "synth_image_size",
        ),
        ("an integer >= 1", _positive_int),
    ),
    "epochs": ("an integer >= 1", lambda v: v is None or _positive_int(v)),
    **dict.fromkeys(("k", "num_workers"), ("an integer >= 0", _non_negative_int)),
    **dict.fromkeys(("seed", "synth_seed"), ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))),
    **dict.fromkeys(
        ("tau", "lr", "audio_seconds", "synth_audio_seconds"), ("a finite number > 0", lambda v: _number(v) and v > 0)
    ),
    **dict.fromkeys(
        ("weight_decay", "weight_match", "weight_div", "weight_recon"),
        ("a finite number >= 0", lambda v: _number(v) and v >= 0),
    ),
    "mask_prob": ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
    # a target slot and an off-target one at least (the divergence term)
    **dict.fromkeys(("targets", "off_targets"), ("an integer >= 1", _positive_int)),
    "synth_classes": ("an integer >= 2", lambda v: _positive_int(v) and v >= 2),
    **{name: (f"one of {', '.join(values)}", lambda v, values=values: v in values) for name, values in CHOICES.items()},
    "compile": ("true or false", lambda v: isinstance(v, bool)),
    **dict.fromkeys(
        ("pretrained_image", "pretrained_audio"),
        ("a path or none", lambda v: v is None or (isinstance(v, str) and v != "")),
    ),
    "val": ("a path or none", lambda v: v is None or isinstance(v, str)),
    "val_fraction": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
}
assert _CHECKS.keys() == SETTINGS.keys(), "every setting has a range check"


def check_settings(values: Mapping[str, Any]) -> None:
    """UsageError naming every flag of `values` (setting name -> value) that is out of range,
    or that conflicts with another, so that a bad flag is named when parsed and never
    reaches the training loop as a ZeroDivisionError or a NaN."""
    problems = [
        f"--{name.replace('_', '-')} must be {expected}, got {values[name]!r}"
        for name, (expected, check) in _CHECKS.items()
        if not check(values[name])
    ]
    if problems:
        raise UsageError("; ".join(problems))
    if values["train_resize"] < values["image_size"]:
        problems.append(f"--train-resize ({values['train_resize']}) must be >= --image-size ({values['image_size']})")
    if values["win_length"] > values["n_fft"]:
        problems.append(f"--win-length ({values['win_length']}) must be <= --n-fft ({values['n_fft']})")
    if values["val"] is not None and values["val_fraction"] > 0:
        problems.append(
            f"--val ({values['val']}) and --val-fraction ({values['val_fraction']}) both choose a validation split: give one"
        )
    if values["k"] > values["batch_size"]:
        problems.append(
            f"--k ({values['k']}) must be <= --batch-size ({values['batch_size']}): k neighbours are looked up in the batch"
        )
    try:  # the clip's own checks, e.g. a clip too short for the FFT
        AudioConfig(**{path[-1]: values[name] for name, path in SETTINGS.items() if path[:2] == ("data", "audio")})
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise UsageError("; ".join(problems))


# The presets, as overrides of the defaults (the paper's).
PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    "paper": {},
    # Small enough that the default main job (synthetic world, train, evaluate) finishes
    # in a few minutes on a 2-core CPU while still localising.
    "tiny": dict(
        dim=64,
        mlp_hidden=128,
        encoder_width=8,
        image_size=112,
        train_resize=123,  # int(1.1 x 112), as the released int(1.1 x 224) = 246
        audio_seconds=1.0,
        n_fft=256,
        win_length=256,
        hop_length=160,
        k=5,
        epochs=10,
        batch_size=64,
        lr=1e-3,
        weight_decay=0.01,
        # fp32: autocast on a CPU is slower, and the run is small
        amp="none",
        # width 8 takes no ImageNet weights; the synthetic world needs none
        pretrained_image="none",
        augment="flip",
        # compiling costs a 2-core CPU minutes, more than a tiny run saves
        compile=False,
        num_workers=2,
        log_every=5,
        synth_image_size=128,
    ),
}
PRESETS: dict[str, RunConfig] = {name: RunConfig().overridden(**changes) for name, changes in PRESET_OVERRIDES.items()}

_HELP: dict[str, str] = {
    "dim": "d: the token and slot width",
    "targets": "T: the first T slots are targets (S = T + O)",
    "off_targets": "O: off-target slots",
    "iters": "slot-attention iterations",
    "mlp_hidden": "hidden width of the slot update MLP",
    "mask_prob": "probability that a token is replaced by the mask token in training",
    "encoder_width": "ResNet-18 base width of both encoders (64: torchvision's network)",
    "backend": "joint slot attention: auto (Triton on CUDA, else PyTorch), triton or torch",
    "tau": "InfoNCE temperature",
    "k": "k-reciprocal neighbours of the false-negative mask (0: no mitigation)",
    "weight_match": "weight of L_match",
    "weight_div": "weight of L_div",
    "weight_recon": "weight of L_recon",
    "directions": "InfoNCE directions: sum (the released code) or mean",
    "image_size": "square image side",
    "train_resize": "training resizes the short side to this before the random crop",
    "augment": "training augmentation of images and spectrograms: released (the released code's), flip (crop and flip) or none",
    "audio_seconds": "clip length in seconds (the middle of the audio)",
    "n_fft": "FFT size of the spectrogram",
    "win_length": "window length of the spectrogram (<= --n-fft)",
    "hop_length": "hop between spectrogram frames, in samples",
    "epochs": "default: by the training set's size, as the released scripts (`released_epochs`)",
    "batch_size": "the GLOBAL batch: pairs per optimiser step over all processes (each of N takes B / N)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "amp": "training autocast: fp16 (with a GradScaler, as released), bf16 or none (fp32); evaluation runs fp32 unless given --amp",
    "compile": "torch.compile the model and losses (pays off for long runs, not tiny ones)",
    "num_workers": "data loader worker processes",
    "seed": "seed of the initialisation, the data order, the augmentation and the masks",
    "pretrained_image": f"the image encoder's start: a local torchvision ResNet-18 state dict (the paper's: {IMAGENET_WEIGHTS}) or none (random)",
    "pretrained_audio": "a local torchvision ResNet-18 state dict for the audio encoder (conv1 summed over RGB), or none",
    "val": "validation split: a VGG-SS style JSON (file, class, bbox) of ids in --data; best.pt by its AP50",
    "val_fraction": "validation split: this fraction of train.txt (test ids excluded), held out; best.pt by its loss",
    "log_every": "write a metrics line every this many steps",
    "synth_train": "synthetic world: training items",
    "synth_test": "synthetic world: test items",
    "synth_classes": "synthetic world: sounding object classes",
    "synth_seed": "synthetic world: the seed it is drawn from",
    "synth_image_size": "synthetic world: image side",
    "synth_audio_seconds": "synthetic world: clip length in seconds",
}
assert _HELP.keys() == SETTINGS.keys(), "every setting has a help text"
_ALIASES = {"pretrained_image": ("--pretrained",)}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _parse_optional_str(text: str) -> str | None:
    return None if text.lower() in ("", "none") else text


# How a flag's text becomes a value: by the type of its default, except these (whose
# default is None; "none" stays a word for the pretrained choices, see OptimConfig).
_PARSERS: dict[Any, Any] = {int: int, float: float, bool: _parse_bool, str: str}
_PARSE = {"epochs": int, "pretrained_image": str, "pretrained_audio": str, "val": _parse_optional_str}


def _preset_defaults(name: str) -> str:
    values = {preset: cfg.settings()[name] for preset, cfg in PRESETS.items()}
    if len(set(map(repr, values.values()))) == 1:
        return f"default {values['paper']}"
    return "default " + ", ".join(f"{value} ({preset})" for preset, value in values.items())


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--preset` and one `--setting-name` option per setting (default: the preset's)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="configuration preset")
    group = parser.add_argument_group("preset overrides")
    defaults = RunConfig().settings()
    for name in SETTINGS:
        parse = _PARSE.get(name) or _PARSERS[type(defaults[name])]
        flag = f"--{name.replace('_', '-')}"
        help_text = f"{_HELP[name]} [{_preset_defaults(name)}]".replace("%", "%%")
        if parse is _parse_bool:
            group.add_argument(
                flag, dest=name, type=parse, nargs="?", const=True, default=None, metavar="BOOL", help=help_text
            )
            group.add_argument(
                f"--no-{flag[2:]}", dest=name, action="store_const", const=False, help=f"the same as {flag} false"
            )
        else:
            # The choices are shown, and checked with the other ranges (`check_settings`).
            metavar = "{" + ",".join(CHOICES[name]) + "}" if name in CHOICES else str(_FIELDS[name].type)
            group.add_argument(
                flag, *_ALIASES.get(name, ()), dest=name, type=parse, default=None, metavar=metavar, help=help_text
            )


def config_from_args(args: argparse.Namespace, default_preset: str, saved: RunConfig | None = None) -> RunConfig:
    """The preset named by --preset (else `saved`, the configuration of a run being
    resumed, else the preset `default_preset`) with the flags given applied over it."""
    base = PRESETS[args.preset] if args.preset else saved or PRESETS[default_preset]
    return base.overridden(**given_overrides(args))


def given_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings set on the command line."""
    return {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}


def saved_config(saved: Mapping[str, Any], source: str) -> RunConfig:
    """The RunConfig a checkpoint stored (`RunConfig.to_dict`, or the flat dict of settings
    that versions before the nested configs wrote): DataError naming `source` when it holds
    settings this version does not know or bad values. A setting it lacks (added since)
    takes its default."""
    try:
        if _is_nested(saved):
            return _from_dict(RunConfig, saved, (), source)
        return RunConfig().overridden(**_migrated_flat(saved, source))
    except DataError:
        raise
    except ValueError as error:  # UsageError, or a sub-config's own check
        raise DataError(f"{source} holds a configuration that is not valid: {error}") from None


def _is_nested(saved: Mapping[str, Any]) -> bool:
    return isinstance(saved.get("model"), Mapping)


def _from_dict(cls: type, saved: Mapping[str, Any], path: tuple[str, ...], source: str) -> Any:
    fields = {option.name: option for option in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise DataError(
            f"{source} was written by another version of jsa-fast: it holds settings unknown here, {['.'.join((*path, name)) for name in unknown]}"
        )
    values = {
        name: _from_dict(fields[name].default_factory, value, (*path, name), source)
        if dataclasses.is_dataclass(fields[name].default_factory) and isinstance(value, Mapping) else value
        for name, value in saved.items()
    }  # fmt: skip
    return cls(**values)


def _migrated_flat(saved: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A flat checkpoint configuration (the settings by name, as versions before the nested
    configs stored it) in today's settings."""
    if "num_slots" in saved:  # written before --targets/--off-targets: slot 0 the target
        saved = {key: value for key, value in saved.items() if key != "num_slots"} | {
            "off_targets": saved["num_slots"] - 1 if _positive_int(saved["num_slots"]) else saved["num_slots"]
        }
    if "color_augment" in saved:  # written before --augment: colour on top of crop and flip, no audio masks
        saved = {key: value for key, value in saved.items() if key != "color_augment"} | {
            "augment": "released" if saved["color_augment"] is True else "flip"
        }
    if "pretrained_image" in saved and saved["pretrained_image"] is None:  # written before "none": random weights
        saved = dict(saved) | {"pretrained_image": "none"}
    unknown = sorted(set(saved) - set(SETTINGS))
    if unknown:
        raise DataError(
            f"{source} was written by another version of jsa-fast: it holds settings unknown here, {unknown}"
        )
    return dict(saved)
