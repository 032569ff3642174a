"""Run-config keys as values: :class:`Key` and the small validity rules keys are built from.

A leaf module (no fl_compams imports), so that :mod:`fl_compams.config` and every compressor module declare
their keys with the same vocabulary without importing each other.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ANY_STR",
    "BETA",
    "BOOL",
    "NONNEG_FLOAT",
    "NONNEG_INT",
    "PLAIN_NAME",
    "PLAIN_NAME_OR_EMPTY",
    "POS_FLOAT",
    "POS_INT",
    "UNIT_OPEN",
    "Key",
    "Rule",
    "choice",
    "key",
    "num_range",
]

#: A validity check and its text for error messages ("must be <text>").
Rule = tuple[Callable[[Any], bool], str]
Side = Literal["client", "server"]


@dataclass(frozen=True)
class Key:
    """One configuration key: default, type, validity check, help line, and who needs it.

    ``side="client"``: clients read the key, so the server sends it with every instruction
    (``protocol.CLIENT_KEYS``); ``"server"``: only the server reads it. Compressor keys are always client keys.
    """

    name: str
    default: Any
    check: Callable[[Any], bool]
    allowed: str
    help: str
    side: Side = "client"

    @property
    def kind(self) -> type:
        """The value type (the default's type: bool, int, float or str)."""
        return type(self.default)


def key(name: str, default: Any, rule: Rule, help: str, side: Side = "client") -> Key:
    """A :class:`Key` from a rule."""
    return Key(name, default, rule[0], rule[1], help, side)


def choice(options: tuple[str, ...]) -> Rule:
    """One of the given strings."""
    return (lambda v: v in options), f"one of {list(options)}"


def num_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A finite number between ``lo`` and ``hi`` (each end open or closed)."""

    def check(v: float) -> bool:
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi) and math.isfinite(v)

    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    return check, f"a number in {lb}{lo}, {hi}{rb}"


ANY_STR: Rule = ((lambda v: True), "any string")
BOOL: Rule = ((lambda v: True), "true or false")
POS_INT: Rule = ((lambda v: v >= 1), "an integer >= 1")
NONNEG_INT: Rule = ((lambda v: v >= 0), "an integer >= 0")
POS_FLOAT: Rule = ((lambda v: v > 0 and math.isfinite(v)), "a finite number > 0")
NONNEG_FLOAT: Rule = ((lambda v: v >= 0 and math.isfinite(v)), "a finite number >= 0")
UNIT_OPEN: Rule = num_range(0.0, 1.0, lo_open=True)
BETA: Rule = num_range(0.0, 1.0, hi_open=True)
#: One path component that is safe in file names and logs: letters, digits, '.', '_', '-', starting with a
#: letter or digit (so never '.', '..' or an option), at most 128 characters.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PLAIN_NAME_OR_EMPTY: Rule = (
    (lambda v: v == "" or PLAIN_NAME.fullmatch(v) is not None),
    "a plain name (letters, digits, '.', '_', '-', starting with a letter or digit, at most 128 characters; "
    "no '/' or '..'), or empty",
)
