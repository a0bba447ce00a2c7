"""Run configuration: nested configs, the presets, and the command-line flags made from them.

A run (`RunConfig`) is the architecture (`ModelConfig`), the loss (`LossConfig`), the
preprocessing (`DataConfig`: `ImageConfig` and `AudioConfig`), the optimisation
(`OptimConfig`) and the bundled synthetic world (`jsa_fast.data.synth.SynthConfig`).

Each setting is declared once, on the config class that owns it (`jsa_fast.settings.setting`:
its default, help, check, flag name, aliases and former names); this module builds from
those declarations the flags, the range checks (`check_settings`) and the reading of older
checkpoints (`saved_config`). The presets are overrides of the defaults.

Every setting is a flag `--setting-name VALUE` (`SETTINGS` maps each name to its place in
the nested config; a boolean, or a choice with an on and an off value such as --compile,
also takes `--setting-name` alone and `--no-setting-name`).
What a run derives (the model's input sizes from the preprocessing, the spectrogram masks
from --augment) is no setting of its own: its field carries no declaration.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from jsa_fast.data.audio import AudioConfig
from jsa_fast.data.image import ImageConfig
from jsa_fast.data.synth import SynthConfig
from jsa_fast.encoders import IMAGENET_WEIGHTS
from jsa_fast.errors import DataError, UsageError
from jsa_fast.losses import LossConfig
from jsa_fast.model import ModelConfig
from jsa_fast.runtime import AMP_DTYPES
from jsa_fast.settings import (
    Setting,
    check_fields,
    declared_setting,
    integer,
    modes,
    number,
    one_of,
    optional,
    parse_bool,
    path_or_none,
    setting,
)

__all__ = [
    "RunConfig",
    "DataConfig",
    "OptimConfig",
    "SETTINGS",
    "PRESETS",
    "add_config_arguments",
    "config_from_args",
    "given_overrides",
    "saved_config",
    "released_epochs",
]


# torch.compile's modes a run may choose; "none" runs eager.
COMPILE_MODES = ("none", "default", "reduce-overhead")


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

    epochs: int | None = setting(
        None, "default: by the training set's size, as the released scripts (`released_epochs`)", optional(integer(1))
    )
    batch_size: int = setting(
        256, "the GLOBAL batch: pairs per optimiser step over all processes (each of N takes B / N)", integer(1)
    )
    lr: float = setting(5e-5, "AdamW learning rate", number(0, include_low=False))
    weight_decay: float = setting(0.01, "AdamW weight decay", number(0))
    amp: str = setting(
        "fp16",
        "training autocast: fp16 (with a GradScaler, as released), bf16 or none (fp32); evaluation runs fp32 unless given --amp",
        one_of(tuple(AMP_DTYPES)),
    )
    compile: str = setting(
        "default",
        "torch.compile the model, losses and backward as one graph: default, reduce-overhead (also CUDA graphs; "
        "CUDA only) or none (eager); pays off for long runs, not tiny ones",
        modes(COMPILE_MODES, on="default", off="none"),
        formerly={"compile": lambda mode: {True: "default", False: "none"}.get(mode, mode)},  # a bool before
    )
    num_workers: int = setting(8, "data loader worker processes", integer(0))
    seed: int = setting(0, "seed of the initialisation, the data order, the augmentation and the masks", integer())
    # The encoders' start: None not chosen (training refuses to start), "none" random
    # weights, else a local torchvision ResNet-18 state dict.
    pretrained_image: str | None = setting(
        None,
        f"the image encoder's start: a local torchvision ResNet-18 state dict (the paper's: {IMAGENET_WEIGHTS}) or none (random)",
        path_or_none(none_word=True),
        aliases=("--pretrained",),
        # an older checkpoint's None meant random weights
        formerly={"pretrained_image": lambda choice: "none" if choice is None else choice},
    )
    pretrained_audio: str | None = setting(
        None,
        "a local torchvision ResNet-18 state dict for the audio encoder (conv1 summed over RGB), or none",
        path_or_none(none_word=True),
    )
    # model selection: best.pt by validation AP50 on `val` (VGG-SS style JSON of ids in
    # --data), or by validation loss on `val_fraction` of train.txt (no boxes there)
    val: str | None = setting(
        None,
        "validation split: a VGG-SS style JSON (file, class, bbox) of ids in --data; best.pt by its AP50",
        path_or_none(none_word=False),
    )
    val_fraction: float = setting(
        0.0,
        "validation split: this fraction of train.txt (test ids excluded), held out; best.pt by its loss",
        number(0, 1, include_high=False),
    )
    log_every: int = setting(10, "write a metrics line every this many steps", integer(1))

    def __post_init__(self) -> None:
        check_fields(self)


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


# Every setting by name, e.g. "mlp_hidden": (("model", "mlp_hidden"), its declaration).
# A leaf field without a declaration is no setting: derived by the run, or fixed.
_DECLARED: dict[str, tuple[tuple[str, ...], dataclasses.Field, Setting]] = {}
for _path, _option in _sections(RunConfig):
    _declaration = declared_setting(_option)
    if _declaration is not None:
        _name = _declaration.name or _option.name
        if _name in _DECLARED:
            raise TypeError(f"two settings are named {_name}: {_DECLARED[_name][0]} and {_path}")
        _DECLARED[_name] = (_path, _option, _declaration)
# setting name -> its path in RunConfig, e.g. "mlp_hidden" -> ("model", "mlp_hidden")
SETTINGS: dict[str, tuple[str, ...]] = {name: path for name, (path, _, _) in _DECLARED.items()}
_NAMES = {path: name for name, path in SETTINGS.items()}


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
        elif place in _NAMES:
            changes[option.name] = values[_NAMES[place]]
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


def check_settings(values: Mapping[str, Any]) -> None:
    """UsageError naming every flag of `values` (setting name -> value) that is out of range,
    or that conflicts with another, so that a bad flag is named when parsed and never
    reaches the training loop as a ZeroDivisionError or a NaN."""
    problems = [
        f"--{name.replace('_', '-')} must be {declaration.check.expected}, got {values[name]!r}"
        for name, (_, _, declaration) in _DECLARED.items()
        if not declaration.check.valid(values[name])
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
        # 5 x 5 tokens: a side the encoder's stride 32 divides, as the paper's 224 (7 x 7). At
        # 112 (3.5 strides) the 4 x 4 grid overhangs the image and its maps, stretched over
        # it, sit off the objects; seeds then scored AP50 0.58-0.90 (docs/results.md).
        image_size=160,
        train_resize=176,  # int(1.1 x 160), as the released int(1.1 x 224) = 246
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
        compile="none",
        num_workers=2,
        log_every=5,
        synth_image_size=128,
    ),
}
PRESETS: dict[str, RunConfig] = {name: RunConfig().overridden(**changes) for name, changes in PRESET_OVERRIDES.items()}


def _preset_defaults(name: str) -> str:
    values = {preset: cfg.settings()[name] for preset, cfg in PRESETS.items()}
    if len(set(map(repr, values.values()))) == 1:
        return f"default {values['paper']}"
    return "default " + ", ".join(f"{value} ({preset})" for preset, value in values.items())


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--preset` and one `--setting-name` option per setting (default: the preset's)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="configuration preset")
    group = parser.add_argument_group("preset overrides")
    for name, (_, option, declaration) in _DECLARED.items():
        check = declaration.check
        flag = f"--{name.replace('_', '-')}"
        help_text = f"{declaration.help} [{_preset_defaults(name)}]".replace("%", "%%")
        if check.switch is not None:
            on, off = check.switch
            metavar = "BOOL" if check.parse is parse_bool else "{" + ",".join(check.choices) + "}"
            group.add_argument(
                flag, dest=name, type=check.parse, nargs="?", const=on, default=None, metavar=metavar, help=help_text
            )
            group.add_argument(
                f"--no-{flag[2:]}",
                dest=name,
                action="store_const",
                const=off,
                help=f"the same as {flag} {str(off).lower()}",
            )
        else:
            # The choices are shown, and checked with the other ranges (`check_settings`).
            metavar = "{" + ",".join(check.choices) + "}" if check.choices else str(option.type)
            group.add_argument(
                flag, *declaration.aliases, dest=name, type=check.parse, default=None, metavar=metavar, help=help_text
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
            return RunConfig().overridden(**_nested_settings(saved, RunConfig, (), source))
        return RunConfig().overridden(**_migrated_flat(saved, source))
    except DataError:
        raise
    except ValueError as error:  # UsageError, or a sub-config's own check
        raise DataError(f"{source} holds a configuration that is not valid: {error}") from None


def _is_nested(saved: Mapping[str, Any]) -> bool:
    return isinstance(saved.get("model"), Mapping)


def _nested_settings(saved: Mapping[str, Any], cls: type, path: tuple[str, ...], source: str) -> dict[str, Any]:
    """The settings (by name) of a nested configuration `saved` (`RunConfig.to_dict` of the
    config class `cls` at `path`); what it stores of fields that are no setting (derived by
    the run) is recomputed, not read."""
    fields = {option.name: option for option in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise DataError(
            f"{source} was written by another version of jsa-fast: it holds settings unknown here, {['.'.join((*path, name)) for name in unknown]}"
        )
    values: dict[str, Any] = {}
    for name, value in saved.items():
        place, factory = (*path, name), fields[name].default_factory
        if dataclasses.is_dataclass(factory):
            if not isinstance(value, Mapping):
                raise DataError(f"{source} holds a configuration whose {'.'.join(place)} is {value!r}, not a section")
            values |= _nested_settings(value, factory, place, source)  # type: ignore[arg-type]
        elif place in _NAMES:
            name = _NAMES[place]
            declaration = _DECLARED[name][2]
            convert = declaration.formerly.get(name)
            # A value of a form this version refuses (e.g. compile's bool before the modes)
            # reads through the setting's converter; a valid one keeps its meaning.
            values[name] = convert(value) if convert and not declaration.check.valid(value) else value
    return values


def _migrated_flat(saved: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A flat checkpoint configuration (the settings by name, as versions before the nested
    configs stored it) in today's settings, by each setting's `formerly`."""
    migrated = dict(saved)
    for name, (_, _, declaration) in _DECLARED.items():
        for old_name, convert in declaration.formerly.items():
            if old_name in migrated:
                value = convert(migrated.pop(old_name))
                migrated[name] = value
    unknown = sorted(set(migrated) - set(SETTINGS))
    if unknown:
        raise DataError(
            f"{source} was written by another version of jsa-fast: it holds settings unknown here, {unknown}"
        )
    return migrated
