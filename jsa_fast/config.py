"""Run configuration: one flat dataclass, the presets, and the command-line overrides.

Every field can be overridden on the command line as `--field-name VALUE` (underscores
become dashes; a boolean field also takes `--field-name` alone and `--no-field-name`); the
model, loss and preprocessing configs are derived from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jsa_fast.cli import DataError, UsageError
from jsa_fast.data.audio import AudioConfig
from jsa_fast.data.image import AUGMENTS, ImageConfig
from jsa_fast.encoders import IMAGENET_WEIGHTS
from jsa_fast.losses import LossConfig
from jsa_fast.model import ModelConfig

__all__ = ["RunConfig", "PRESETS", "add_config_arguments", "config_from_args", "given_overrides", "saved_config", "released_epochs"]


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs, flat so that every field is a command-line
    option; defaults are the `paper` preset (docs/model.md), taken from the model, loss and
    preprocessing configs that own them."""

    # model
    dim: int = ModelConfig.dim
    targets: int = field(default=ModelConfig.targets, metadata={"help": "T: the first T slots are targets (S = T + O)"})
    off_targets: int = field(default=ModelConfig.off_targets, metadata={"help": "O: off-target slots"})
    iters: int = ModelConfig.iters
    mlp_hidden: int = ModelConfig.mlp_hidden
    mask_prob: float = ModelConfig.mask_prob
    encoder_width: int = ModelConfig.encoder_width
    backend: str = ModelConfig.backend
    # None: not chosen (training refuses to start), "none": random weights
    pretrained_image: str | None = field(
        default=None,
        metadata={
            "help": f"the image encoder's start: a local torchvision ResNet-18 state dict (the paper's: {IMAGENET_WEIGHTS}) or none (random)",
            "aliases": ("--pretrained",),
            "parse": str,
        },
    )
    pretrained_audio: str | None = field(
        default=None,
        metadata={"help": "a local torchvision ResNet-18 state dict for the audio encoder (conv1 summed over RGB), or none", "parse": str},
    )
    # preprocessing
    image_size: int = ImageConfig.size
    train_resize: int = ImageConfig.train_resize
    augment: str = field(
        default=ImageConfig.augment,
        metadata={"help": "training augmentation of images and spectrograms: released (the released code's), flip (crop and flip) or none"},
    )
    audio_seconds: float = AudioConfig.seconds
    n_fft: int = AudioConfig.n_fft
    win_length: int = AudioConfig.win_length
    hop_length: int = AudioConfig.hop_length
    # loss
    tau: float = LossConfig.tau
    k: int = LossConfig.k
    weight_match: float = LossConfig.weight_match
    weight_div: float = LossConfig.weight_div
    weight_recon: float = LossConfig.weight_recon
    directions: str = LossConfig.directions
    # optimisation
    epochs: int | None = field(
        default=None, metadata={"help": "default: by the training set's size, as the released scripts (`released_epochs`)", "parse": int}
    )
    batch_size: int = field(
        default=256,
        metadata={"help": "the GLOBAL batch: pairs per optimiser step over all processes (each of N takes B / N)"},
    )
    lr: float = 5e-5
    weight_decay: float = 0.01
    amp: str = field(
        default="fp16",
        metadata={"help": "training autocast: fp16 (with a GradScaler, as released), bf16 or none (fp32); evaluation runs fp32 unless given --amp"},
    )
    compile: bool = field(
        default=True, metadata={"help": "torch.compile the model and losses (pays off for long runs, not tiny ones)"}
    )
    num_workers: int = 8
    seed: int = 0
    # model selection: best.pt by validation AP50 on --val (VGG-SS style JSON of ids in
    # --data), or by validation loss on --val-fraction of train.txt (no boxes there)
    val: str | None = field(default=None, metadata={"help": "validation split: a VGG-SS style JSON (file, class, bbox) of ids in --data; best.pt by its AP50"})
    val_fraction: float = field(
        default=0.0, metadata={"help": "validation split: this fraction of train.txt (test ids excluded), held out; best.pt by its loss"}
    )
    log_every: int = 10
    # the bundled synthetic world, used when no --data is given
    synth_train: int = 2000
    synth_test: int = 200
    synth_classes: int = 6
    synth_seed: int = 0
    synth_image_size: int = 224
    synth_audio_seconds: float = 2.0

    def __post_init__(self) -> None:
        """Every field checked against its range, so that a bad flag is named when parsed
        (UsageError) and never reaches the training loop as a ZeroDivisionError or a NaN."""
        problems = [problem for name in _CHECKS for problem in [_field_problem(self, name)] if problem]
        if problems:
            raise UsageError("; ".join(problems))
        if self.train_resize < self.image_size:
            problems.append(f"--train-resize ({self.train_resize}) must be >= --image-size ({self.image_size})")
        if self.win_length > self.n_fft:
            problems.append(f"--win-length ({self.win_length}) must be <= --n-fft ({self.n_fft})")
        if self.val is not None and self.val_fraction > 0:
            problems.append(f"--val ({self.val}) and --val-fraction ({self.val_fraction}) both choose a validation split: give one")
        if self.k > self.batch_size:
            problems.append(f"--k ({self.k}) must be <= --batch-size ({self.batch_size}): k neighbours are looked up in the batch")
        try:
            self.audio_config()  # its own checks, e.g. a clip too short for the FFT
        except ValueError as error:
            problems.append(str(error))
        if problems:
            raise UsageError("; ".join(problems))

    def model_config(self, start_weights: bool = False) -> ModelConfig:
        """The architecture; with `start_weights` also the pretrained files its encoders
        load when built (training's start; a trained model's weights come from its
        checkpoint, so evaluation needs no such file)."""
        _, bins, frames = self.audio_config().spectrogram_shape
        return ModelConfig(
            dim=self.dim,
            targets=self.targets,
            off_targets=self.off_targets,
            iters=self.iters,
            mlp_hidden=self.mlp_hidden,
            mask_prob=self.mask_prob,
            image_size=self.image_size,
            spec_bins=bins,
            spec_frames=frames,
            encoder_width=self.encoder_width,
            backend=self.backend,
            pretrained_image=_weights_file(self.pretrained_image) if start_weights else None,
            pretrained_audio=_weights_file(self.pretrained_audio) if start_weights else None,
        )

    def loss_config(self) -> LossConfig:
        return LossConfig(self.tau, self.k, self.weight_match, self.weight_div, self.weight_recon, self.directions)

    def audio_config(self) -> AudioConfig:
        return AudioConfig(
            seconds=self.audio_seconds,
            n_fft=self.n_fft,
            win_length=self.win_length,
            hop_length=self.hop_length,
            spec_augment=self.augment == "released",
        )

    def image_config(self) -> ImageConfig:
        return ImageConfig(size=self.image_size, train_resize=self.train_resize, augment=self.augment)

    def synth_kwargs(self) -> dict[str, Any]:
        """Arguments of `jsa_fast.data.synth.ensure_synthetic_dataset`."""
        return dict(
            n_train=self.synth_train,
            n_test=self.synth_test,
            seed=self.synth_seed,
            image_size=self.synth_image_size,
            audio_seconds=self.synth_audio_seconds,
            num_classes=self.synth_classes,
        )


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


# field -> (what it must be, the check)
_CHECKS: dict[str, tuple[str, Any]] = {
    **dict.fromkeys(
        ("dim", "iters", "mlp_hidden", "encoder_width", "image_size", "train_resize", "n_fft",
         "win_length", "hop_length", "batch_size", "log_every", "synth_train", "synth_test",
         "synth_image_size"),
        ("an integer >= 1", _positive_int),
    ),
    "epochs": ("an integer >= 1", lambda v: v is None or _positive_int(v)),
    **dict.fromkeys(("k", "num_workers"), ("an integer >= 0", _non_negative_int)),
    **dict.fromkeys(("seed", "synth_seed"), ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))),
    **dict.fromkeys(("tau", "lr", "audio_seconds", "synth_audio_seconds"), ("a finite number > 0", lambda v: _number(v) and v > 0)),
    **dict.fromkeys(
        ("weight_decay", "weight_match", "weight_div", "weight_recon"), ("a finite number >= 0", lambda v: _number(v) and v >= 0)
    ),
    "mask_prob": ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
    # a target slot and an off-target one at least (the divergence term)
    **dict.fromkeys(("targets", "off_targets"), ("an integer >= 1", _positive_int)),
    "synth_classes": ("an integer >= 2", lambda v: _positive_int(v) and v >= 2),
    "backend": ("one of auto, triton, torch", lambda v: v in ("auto", "triton", "torch")),
    "amp": ("one of bf16, fp16, none", lambda v: v in ("bf16", "fp16", "none")),
    "directions": ("one of sum, mean", lambda v: v in ("sum", "mean")),
    "augment": (f"one of {', '.join(AUGMENTS)}", lambda v: v in AUGMENTS),
    "compile": ("true or false", lambda v: isinstance(v, bool)),
    **dict.fromkeys(("pretrained_image", "pretrained_audio"), ("a path or none", lambda v: v is None or (isinstance(v, str) and v != ""))),
    "val": ("a path or none", lambda v: v is None or isinstance(v, str)),
    "val_fraction": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
}


def _field_problem(cfg: RunConfig, name: str) -> str | None:
    expected, check = _CHECKS[name]
    value = getattr(cfg, name)
    return None if check(value) else f"--{name.replace('_', '-')} must be {expected}, got {value!r}"


PRESETS: dict[str, RunConfig] = {
    "paper": RunConfig(),
    # Small enough that the default main job (synthetic world, train, evaluate) finishes
    # in a few minutes on a 2-core CPU while still localising.
    "tiny": RunConfig(
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


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _parse_optional_str(text: str) -> str | None:
    return None if text.lower() in ("", "none") else text


_PARSERS = {int: int, float: float, bool: _parse_bool, str: str}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--preset` and one `--field-name` option per RunConfig field (default: the preset's)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="configuration preset")
    group = parser.add_argument_group("preset overrides")
    for option in dataclasses.fields(RunConfig):
        parse = option.metadata.get("parse") or (_parse_optional_str if option.default is None else _PARSERS[type(option.default)])
        flag = f"--{option.name.replace('_', '-')}"
        help_text = option.metadata.get("help")
        if parse is _parse_bool:
            group.add_argument(flag, dest=option.name, type=parse, nargs="?", const=True, default=None, metavar="BOOL", help=help_text)
            group.add_argument(f"--no-{flag[2:]}", dest=option.name, action="store_const", const=False)
        else:
            flags = (flag, *option.metadata.get("aliases", ()))
            group.add_argument(*flags, dest=option.name, type=parse, default=None, metavar=str(option.type), help=help_text)


def config_from_args(args: argparse.Namespace, default_preset: str, saved: RunConfig | None = None) -> RunConfig:
    """The preset named by --preset (else `saved`, the configuration of a run being
    resumed, else the preset `default_preset`) with the flags given applied over it."""
    base = PRESETS[args.preset] if args.preset else saved or PRESETS[default_preset]
    return dataclasses.replace(base, **given_overrides(args))


def given_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if getattr(args, f.name) is not None}


def saved_config(saved: Mapping[str, Any], source: str) -> RunConfig:
    """The RunConfig a checkpoint stored (`dataclasses.asdict`): DataError naming `source`
    when it holds settings this version does not know or bad values. A setting it lacks
    (added since) takes its default."""
    if "num_slots" in saved:  # written before --targets/--off-targets: slot 0 the target
        saved = {key: value for key, value in saved.items() if key != "num_slots"} | {
            "off_targets": saved["num_slots"] - 1 if _positive_int(saved["num_slots"]) else saved["num_slots"]
        }
    if "color_augment" in saved:  # written before --augment: colour on top of crop and flip, no audio masks
        saved = {key: value for key, value in saved.items() if key != "color_augment"} | {
            "augment": "released" if saved["color_augment"] is True else "flip"
        }
    if "pretrained_image" in saved and saved["pretrained_image"] is None:  # written before "none": random weights
        saved = saved | {"pretrained_image": "none"}
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise DataError(f"{source} was written by another version of jsa-fast: it holds settings unknown here, {unknown}")
    try:
        return RunConfig(**saved)
    except UsageError as error:
        raise DataError(f"{source} holds a configuration that is not valid: {error}") from None
