"""Settings declared once, on the config dataclass that owns them.

A field declared with `setting(...)` is a setting: its default, its help text, what its
values must be (a `Check`: the words, the test, the flag's parser and its choices), its
flag's name and aliases, and the names an older checkpoint stored it under are written
there and nowhere else. `jsa_fast.config` builds the command-line flags, their range
checks and the checkpoint migration from these declarations; each config dataclass runs
the same checks on itself when built (`check_fields`).

    @dataclass(frozen=True)
    class LossConfig:
        tau: float = setting(0.03, "InfoNCE temperature", number(0, include_low=False))
        ...
        def __post_init__(self) -> None:
            check_fields(self)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Check",
    "Setting",
    "setting",
    "declared_setting",
    "setting_fields",
    "check_fields",
    "integer",
    "number",
    "one_of",
    "boolean",
    "modes",
    "optional",
    "path_or_none",
    "parse_bool",
]

_KEY = "jsa_fast.setting"


@dataclass(frozen=True)
class Check:
    """What a setting's values must be: `expected` in words ("an integer >= 1"), `valid`
    the test, `parse` the flag's text to a value, `choices` the values a flag lists,
    `switch` the values of `--name` alone and of `--no-name` (None: the flag takes a value)."""

    expected: str
    valid: Callable[[Any], bool]
    parse: Callable[[str], Any]
    choices: tuple[str, ...] | None = None
    switch: tuple[Any, Any] | None = None


@dataclass(frozen=True)
class Setting:
    """A setting's declaration (see `setting`)."""

    help: str
    check: Check
    name: str | None
    aliases: tuple[str, ...]
    formerly: Mapping[str, Callable[[Any], Any]]


def setting(
    default: Any,
    help: str,
    check: Check,
    *,
    name: str | None = None,
    aliases: tuple[str, ...] = (),
    formerly: Mapping[str, Callable[[Any], Any]] | None = None,
) -> Any:
    """A dataclass field that is a setting: `default`, `help` (the flag's text), `check`
    (what its values must be). name: the setting's (and flag's) name when not the field's;
    aliases: further flags; formerly: {name an older flat checkpoint stored: how its value
    becomes this setting's} (the same name when only the value's meaning changed)."""
    declaration = Setting(help, check, name, tuple(aliases), dict(formerly or {}))
    return dataclasses.field(default=default, metadata={_KEY: declaration})


def declared_setting(option: dataclasses.Field) -> Setting | None:
    """The field's `Setting`, or None when the field is no setting (derived or fixed)."""
    return option.metadata.get(_KEY)


def setting_fields(cls: type) -> Iterator[tuple[dataclasses.Field, Setting]]:
    """(field, declaration) of each setting of the dataclass `cls` (not nested ones)."""
    for option in dataclasses.fields(cls):
        declaration = declared_setting(option)
        if declaration is not None:
            yield option, declaration


def check_fields(config: Any) -> None:
    """ValueError naming `Class.field`, what it must be and what it is, for each setting
    of the dataclass instance `config` whose value fails its check."""
    problems = [
        f"{type(config).__name__}.{option.name} must be {declaration.check.expected}, got {getattr(config, option.name)!r}"
        for option, declaration in setting_fields(type(config))
        if not declaration.check.valid(getattr(config, option.name))
    ]
    if problems:
        raise ValueError("; ".join(problems))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_bool(text: str) -> bool:
    """A flag's boolean: 1/true/yes/on or 0/false/no/off, any case."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def integer(low: int | None = None) -> Check:
    """An int (no bool), >= low when given."""
    return Check(
        "an integer" if low is None else f"an integer >= {low}",
        lambda value: _is_int(value) and (low is None or value >= low),
        int,
    )


def number(low: float, high: float | None = None, *, include_low: bool = True, include_high: bool = True) -> Check:
    """A finite int or float (no bool) above `low` (and below `high` when given)."""

    def valid(value: Any) -> bool:
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            return False
        above = value >= low if include_low else value > low
        below = high is None or (value <= high if include_high else value < high)
        return above and below

    if high is None:
        expected = f"a finite number {'>=' if include_low else '>'} {low:g}"
    else:
        expected = f"a number in {'[' if include_low else '('}{low:g}, {high:g}{']' if include_high else ')'}"
    return Check(expected, valid, float)


def one_of(values: tuple[str, ...]) -> Check:
    """One of the strings `values` (the flag's choices)."""
    return Check(f"one of {', '.join(values)}", lambda value: value in values, str, choices=tuple(values))


def boolean() -> Check:
    """True or False (a flag takes `--name`, `--name BOOL` and `--no-name`)."""
    return Check("true or false", lambda value: isinstance(value, bool), parse_bool, switch=(True, False))


def modes(values: tuple[str, ...], on: str, off: str) -> Check:
    """One of the strings `values`, a switch: `--name` alone is `on`, `--no-name` `off`, and
    a boolean word (true/false, yes/no, on/off, 1/0) means the same."""

    def parse(text: str) -> str:
        if text in values:
            return text
        try:
            return on if parse_bool(text) else off
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(values)}, got {text!r}") from None

    return Check(f"one of {', '.join(values)}", lambda value: value in values, parse, tuple(values), (on, off))


def optional(check: Check) -> Check:
    """None (the setting's default: chosen by the run) or what `check` accepts."""
    return Check(check.expected, lambda value: value is None or check.valid(value), check.parse, check.choices)


def path_or_none(*, none_word: bool) -> Check:
    """A path, or None. none_word: the flag's "none" stays the word "none" (a choice of
    its own, e.g. random weights); else "none" (and "") mean None."""

    def parse(text: str) -> str | None:
        return None if not none_word and text.lower() in ("", "none") else text

    return Check(
        "a path or none",
        lambda value: value is None or (isinstance(value, str) and (value != "" or not none_word)),
        parse,
    )
