"""User-facing errors and the small validators every config-built object uses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class GGDAError(ValueError):
    """An error caused by input the user can fix; the message says how.

    ``run.py`` prints these without a traceback and exits with status 2.
    """


class ConfigError(GGDAError):
    """A config value is out of range or of the wrong kind."""

    def __init__(self, key: str, value: Any, allowed: str, hint: str = "") -> None:
        msg = f"config key `{key}` = {value!r} is invalid: expected {allowed}."
        if hint:
            msg += f" {hint}"
        super().__init__(msg)
        self.key = key


def check_int(key: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """Return ``value`` as int if ``lo <= value <= hi``, else raise :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(key, value, _range_text("an integer", lo, hi))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(key, value, _range_text("an integer", lo, hi))
    return int(value)


def check_float(
    key: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """Return ``value`` as float if it lies in the (half-)open/closed range, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, _range_text("a number", lo, hi, lo_open, hi_open))
    v = float(value)
    bad = v != v  # NaN
    if lo is not None:
        bad |= v <= lo if lo_open else v < lo
    if hi is not None:
        bad |= v >= hi if hi_open else v > hi
    if bad:
        raise ConfigError(key, value, _range_text("a number", lo, hi, lo_open, hi_open))
    return v


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise naming them."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def _range_text(kind: str, lo: Any, hi: Any, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is None and hi is None:
        return kind
    if hi is None:
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{kind} {'<' if hi_open else '<='} {hi}"
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    return f"{kind} in {left}{lo}, {hi}{right}"
