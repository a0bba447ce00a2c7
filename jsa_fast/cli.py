"""The command lines' error convention, in one place for every `python -m jsa_fast.*` CLI.

A CLI's bad input (a flag, a file, a data set, an output folder it must not overwrite)
ends in ONE line on stderr, `<prog>: error: <what, naming the culprit>`, and exit status 2;
a run that stops on its own (a non-finite loss, a full disk) in one such line and exit
status 1. No traceback, unless `--debug` is on the command line or JSA_FAST_DEBUG=1 is in
the environment; then the traceback comes first and the same line and status follow.

    from jsa_fast.cli import ArgumentParser, command
    from jsa_fast.errors import UsageError

    @command("jsa_fast.prepare")
    def main(argv: list[str] | None = None) -> int:
        args = ArgumentParser(prog="python -m jsa_fast.prepare").parse_args(argv)  # has --debug
        if args.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {args.workers}")
        ...
        return 0

What counts as bad input: `jsa_fast.errors.JsaFastError` and its subclasses, and any
ValueError or OSError (the library's argument and file checks raise those, naming what
they saw).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from jsa_fast.errors import Interrupted, JsaFastError, UsageError

__all__ = [
    "ArgumentParser",
    "bounded",
    "command",
    "one_line",
    "missing_extra",
    "EXTRA_MODULES",
    "DEBUG_ENV",
]

DEBUG_ENV = "JSA_FAST_DEBUG"


def one_line(error: BaseException) -> str:
    """The error's message on one line: its lines joined with '; ', indentation dropped."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `--debug`, whose errors are raised as UsageError (so that `command`
    prints them as one line) instead of a usage block and SystemExit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help=f"show tracebacks of errors (or set {DEBUG_ENV}=1)")

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


def bounded(kind: type, low: float | None = None, high: float | None = None) -> Callable[[str], Any]:
    """An argparse `type=` for a finite int or float within [low, high] (None: unbounded),
    so that a bad value is named when the flags are parsed: `type=bounded(int, low=1)`."""
    if low is not None and high is not None:
        limit = f" in [{low}, {high}]"
    else:
        limit = f" >= {low}" if low is not None else f" <= {high}" if high is not None else ""
    expected = f"{'an integer' if kind is int else 'a finite number'}{limit}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return parse


def _debug_requested(argv: list[str] | None) -> bool:
    """--debug on the command line, or JSA_FAST_DEBUG set to 1, true, yes or on (any case);
    0, false, no, off or unset leave tracebacks off."""
    arguments = sys.argv[1:] if argv is None else argv
    return "--debug" in arguments or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings' signature
    return f"warning: {one_line(message) if isinstance(message, Warning) else message}\n"


# The modules of each optional extra (pyproject.toml), by the name a missing one is imported as.
EXTRA_MODULES = {
    **dict.fromkeys(("torchvision", "torchaudio", "soundfile", "PIL", "tqdm", "matplotlib"), "train"),
    "av": "video",
    "nvidia.dali": "dali",
}


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """What to say for a module of an optional extra that is not installed ("tqdm is not
    installed: pip install 'jsa-fast[train]'"), or None when the module is no extra's."""
    missing = error.name or ""
    # Without any nvidia-* wheel (a CPU torch), `import nvidia.dali` misses "nvidia".
    module = "nvidia.dali" if missing == "nvidia" else missing
    module = next((name for name in EXTRA_MODULES if module == name or module.startswith(f"{name}.")), None)
    if module is None:
        return None
    return f"{module} is not installed: pip install 'jsa-fast[{EXTRA_MODULES[module]}]'"


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def command(prog: str) -> Callable[[Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    """Decorate a CLI's `main(argv) -> exit status` with the convention above; `prog`
    starts each error line. Warnings print as one `warning: ...` line; Ctrl-C ends with
    status 130 and one line, SIGTERM (raised as `Interrupted` where it arrives, so that
    cleanups run) with 143."""

    def decorate(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            debug = _debug_requested(argv)
            previous_format = warnings.formatwarning
            if not debug:
                warnings.formatwarning = _format_warning
            previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupted)
            try:
                return main(argv)
            except KeyboardInterrupt as error:
                if debug:
                    traceback.print_exc()
                signum = error.signum if isinstance(error, Interrupted) else signal.SIGINT
                said = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
                print(f"{prog}: {said}", file=sys.stderr)
                return 128 + signum
            except ModuleNotFoundError as error:
                said = missing_extra(error)
                if said is None:  # not an optional extra's: a bug, shown as one
                    raise
                if debug:
                    traceback.print_exc()
                print(f"{prog}: error: {said}", file=sys.stderr)
                return 2
            except (JsaFastError, ValueError, OSError) as error:
                if debug:
                    traceback.print_exc()
                print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
                return error.exit_code if isinstance(error, JsaFastError) else 2
            finally:
                warnings.formatwarning = previous_format
                signal.signal(signal.SIGTERM, previous_sigterm)

        return run

    return decorate
