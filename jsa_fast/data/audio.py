"""Audio preprocessing (docs/model.md "Preprocessing"): mono 16 kHz, middle clip, log spectrogram."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import soundfile
import torch
import torchaudio.functional as AF
from torch import Tensor

from jsa_fast.errors import DataError
from jsa_fast.settings import check_fields, integer, number, setting

SAMPLE_RATE = 16000  # Hz, the paper's (and every data set's here)


@dataclass(frozen=True)
class AudioConfig:
    """How a clip becomes a spectrogram; the defaults are the paper's (5 s -> 1 x 257 x 501).
    spec_augment: in training, one frequency and one time mask (`mask_spectrogram`)."""

    sample_rate: int = SAMPLE_RATE
    seconds: float = setting(
        5.0, "clip length in seconds (the middle of the audio)", number(0, include_low=False), name="audio_seconds"
    )
    n_fft: int = setting(512, "FFT size of the spectrogram", integer(1))
    win_length: int = setting(512, "window length of the spectrogram (<= --n-fft)", integer(1))
    hop_length: int = setting(160, "hop between spectrogram frames, in samples", integer(1))
    spec_augment: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if not isinstance(self.sample_rate, int) or self.sample_rate < 1:
            raise ValueError(f"AudioConfig.sample_rate must be a positive int, got {self.sample_rate!r}")
        if self.win_length > self.n_fft:
            raise ValueError(f"AudioConfig.win_length ({self.win_length}) must not exceed n_fft ({self.n_fft})")
        if self.num_samples <= self.n_fft // 2:  # the centred frames reflect-pad n_fft // 2 samples
            raise ValueError(
                f"AudioConfig.seconds ({self.seconds}) gives {self.num_samples} samples at "
                f"{self.sample_rate} Hz, too few for n_fft {self.n_fft} (more than {self.n_fft // 2} needed)"
            )

    @property
    def num_samples(self) -> int:
        """Length of the clip fed to the spectrogram, in samples."""
        return round(self.sample_rate * self.seconds)

    @property
    def spectrogram_shape(self) -> tuple[int, int, int]:
        """1 x F x T of `log_spectrogram` on a clip of `num_samples` (centred frames)."""
        return (1, self.n_fft // 2 + 1, self.num_samples // self.hop_length + 1)

    @property
    def mask_widths(self) -> tuple[int, int]:
        """(frequency, time): each mask's width is drawn from 0 .. bound - 1 bins. The
        released masks are narrower than 10 bins at 16 kHz, n_fft 512, hop 160, i.e. less
        than 312.5 Hz and 100 ms; other settings keep those spans (n_fft 256: 5 and 10)."""
        released_hz, released_s = 10 * SAMPLE_RATE / 512, 10 * 160 / SAMPLE_RATE
        bin_hz, frame_s = self.sample_rate / self.n_fft, self.hop_length / self.sample_rate
        return max(1, round(released_hz / bin_hz)), max(1, round(released_s / frame_s))


def load_audio(path: str | Path, sample_rate: int) -> Tensor:
    """Read any WAV soundfile understands (int, 24-bit, float; any channel count or rate).

    Returns a 1-D float32 tensor: the channel average, resampled to `sample_rate`.
    DataError naming the file when it holds no samples, NaN or infinite ones (a float WAV
    can), or only zeros (a silent clip has no sound to localise).
    """
    if sample_rate < 1:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    samples, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    if samples.shape[0] == 0:
        raise DataError(f"{path}: the audio file holds no samples")
    wave = torch.from_numpy(samples)
    non_finite = int((~torch.isfinite(wave)).sum())
    if non_finite:
        raise DataError(f"{path}: {non_finite} of {wave.numel()} samples are not finite (NaN or inf)")
    if not wave.any():
        raise DataError(f"{path}: the audio is silent (all {wave.numel()} samples are 0)")
    wave = wave.mean(dim=1)
    if file_rate != sample_rate:
        wave = AF.resample(wave, orig_freq=file_rate, new_freq=sample_rate)
    return wave


def middle_clip(wave: Tensor, num_samples: int) -> Tensor:
    """The middle `num_samples` of a 1-D wave; a shorter wave is tiled from its start first."""
    if wave.ndim != 1:
        raise ValueError(f"wave must be 1-D, got shape {tuple(wave.shape)}")
    if wave.numel() == 0:
        raise ValueError("wave is empty")
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    length = wave.numel()
    if length < num_samples:
        return wave.repeat(num_samples // length + 1)[:num_samples]
    start = (length - num_samples) // 2
    return wave[start : start + num_samples]


def log_spectrogram(wave: Tensor, cfg: AudioConfig) -> Tensor:
    """1-D wave -> 1 x F x T float32: log(|STFT|^2 + 1e-7) / 12.

    Centred frames with reflect padding and a periodic Hann window, like
    torchaudio.transforms.Spectrogram(n_fft, win_length, hop_length, power=2).
    """
    if wave.ndim != 1:
        raise ValueError(f"wave must be 1-D, got shape {tuple(wave.shape)}")
    power = AF.spectrogram(
        wave.float(),
        pad=0,
        window=torch.hann_window(cfg.win_length, device=wave.device),
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        win_length=cfg.win_length,
        power=2.0,
        normalized=False,
        center=True,
        pad_mode="reflect",
        onesided=True,
    )
    return (torch.log(power + 1e-7) / 12.0).unsqueeze(0)


def wav_to_spectrogram(path: str | Path, cfg: AudioConfig) -> Tensor:
    """docs/model.md's whole audio path: file -> mono at cfg.sample_rate -> middle clip -> 1 x F x T.

    DataError naming the file when the spectrogram is not finite (samples so large that
    their power overflows float32)."""
    wave = load_audio(path, cfg.sample_rate)
    spec = log_spectrogram(middle_clip(wave, cfg.num_samples), cfg)
    if not torch.isfinite(spec).all():
        peak = float(wave.abs().max())
        raise DataError(
            f"{path}: the spectrogram is not finite (samples up to {peak:.3g}, beyond float32's range once squared)"
        )
    return spec


def mask_spectrogram(spec: Tensor, cfg: AudioConfig) -> Tensor:
    """The released training's audio augmentation (dataset.py, hard_aud: FrequencyMask,
    then TimeMask, max_width 10, use_mean=False) on a 1 x F x T log spectrogram: a copy
    with frequency bins [f, f + w_f) and frames [t, t + w_t) set to 0 (cut at the edge),
    f drawn from 0 .. F - 1, t from 0 .. T - 1, w_f and w_t below `cfg.mask_widths`.

    The released classes draw each mask's start over the other axis's length (the
    frequency mask's over T, the time mask's over F): at 257 x 501 the frequency mask
    falls outside the spectrogram about half of the time and the time mask never starts
    after frame 256. Here each start is drawn over its own axis. Draws come from torch's
    global RNG (start, then width; frequency, then time), like the image transform's.
    """
    if spec.dim() != 3:
        raise ValueError(f"spec must be 1 x F x T, got shape {tuple(spec.shape)}")
    freq_bound, time_bound = cfg.mask_widths
    masked = spec.clone()
    for axis, bound in ((1, freq_bound), (2, time_bound)):
        start = int(torch.randint(spec.shape[axis], ()))
        width = int(torch.randint(bound, ()))
        masked.narrow(axis, start, min(width, spec.shape[axis] - start)).zero_()
    return masked
