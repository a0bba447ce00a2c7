"""The console scripts (`jsa-train`, `jsa-evaluate`, `jsa-prepare`, `jsa-localize`;
pyproject.toml's [project.scripts]).

Each imports its command line when run, under the command-line convention
(`jsa_fast.cli.command`, which names a missing optional extra in one line, exit 2): the
command lines import their extras (torchvision, tqdm, matplotlib, ...) when they are
imported, before their own `main` could say so. `python -m jsa_fast.train` and the others run the same `main`.
"""

from __future__ import annotations

import importlib

from jsa_fast.cli import command

__all__ = ["train", "evaluate", "prepare", "localize"]


def _run(module: str, prog: str) -> int:
    @command(prog)
    def imported_main(argv: list[str] | None = None) -> int:
        return importlib.import_module(module).main(argv)

    return imported_main()


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
