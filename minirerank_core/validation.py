"""Argument checks shared by every entry point (rerankers, pipeline, integrations, CLI, server).

One function per kind of value and one error type per mistake: a bad query is an InvalidQueryError, a bad
count, ratio or choice a ConfigError, wherever it is passed. Integers may be any integral type (numpy ints
included), never bool.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any, TypeVar

from .errors import ConfigError, InvalidQueryError

T = TypeVar("T")


def check_query(query: Any) -> str:
    """A non-empty, non-blank string (its length in tokens is checked by the reranker that tokenises it)."""
    if not isinstance(query, str) or not query.strip():
        shown = query if not isinstance(query, str) else query[:40]
        raise InvalidQueryError(f"query must be a non-empty string, got {shown!r}")
    return query


def as_int(value: Any) -> int | None:
    """``value`` as a Python int when it is an integer (numpy ints too, bool not), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_positive_int(name: str, value: Any) -> int:
    n = as_int(value)
    if n is None or n < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return n


def check_optional_positive_int(name: str, value: Any) -> int | None:
    return None if value is None else check_positive_int(name, value)


def check_top_n(top_n: Any) -> int | None:
    """``top_n``: a positive int, or None for all."""
    return check_optional_positive_int("top_n", top_n)


def check_ratio(name: str, value: Any) -> float:
    """A fraction in (0, 1] (any real number type, numpy's included; not bool or str)."""
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")
    x = float(value)
    if not (math.isfinite(x) and 0.0 < x <= 1.0):
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
    return x


def check_optional_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise ConfigError(f"{name} must be a number or None, got {value!r}")
    return float(value)


def check_choice(name: str, value: T, choices: Iterable[T]) -> T:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


__all__ = ["as_int", "check_choice", "check_optional_float", "check_optional_positive_int", "check_positive_int",
           "check_query", "check_ratio", "check_top_n"]
