"""The console scripts (`jsa-train`, `jsa-evaluate`, `jsa-prepare`, `jsa-localize`;
pyproject.toml's [project.scripts]).

Each imports its command line when run, inside the check that turns a missing optional
extra into one line (`jsa_fast.cli.missing_extra`, exit 2): the command lines import
their extras (torchvision, tqdm, matplotlib, ...) when they are imported, before their
own `main` could say so. `python -m jsa_fast.train` and the others run the same `main`.
"""

from __future__ import annotations

import importlib
import sys

from jsa_fast.cli import missing_extra

__all__ = ["train", "evaluate", "prepare", "localize"]


def _run(module: str, prog: str) -> int:
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as error:
        said = missing_extra(error)
        if said is None:
            raise
        print(f"{prog}: error: {said}", file=sys.stderr)
        return 2
    return main()


def train() -> int:
    """jsa-train: `python -m jsa_fast.train`."""
    return _run("jsa_fast.train", "jsa-train")


def evaluate() -> int:
    """jsa-evaluate: `python -m jsa_fast.evaluate`."""
    return _run("jsa_fast.evaluate", "jsa-evaluate")


def prepare() -> int:
    """jsa-prepare: `python -m jsa_fast.prepare`."""
    return _run("jsa_fast.prepare", "jsa-prepare")


def localize() -> int:
    """jsa-localize: `python -m jsa_fast.localize`."""
    return _run("jsa_fast.localize", "jsa-localize")
