"""Test-session setup and the fixtures several test modules share.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched
on before any @triton.jit function is defined: pytest imports this file before the test
modules, and so before `jsa_fast` (which imports `kernels`).

Session fixtures are built once and shared: a test that changes one works on a copy
(`shutil.copytree(world, tmp_path / ...)`), so that no test depends on another's order.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from jsa_fast.data.synth import generate_synthetic_dataset  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro synthetic world of the training, evaluation and CLI tests: 10 training
    items (train_000000..9), 6 annotated test items, 64 x 64 images, 1 s of audio. Read
    only: copy it to change it."""
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("world"), n_train=10, n_test=6, seed=3, image_size=64, audio_seconds=1.0
    )
