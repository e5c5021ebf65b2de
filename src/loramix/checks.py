"""Whether a value has the type a dataclass field is annotated with: the one check behind GenerateConfig's fields
and loramix.json's (report.read_report). Imports nothing of loramix, so that any module may use it."""

from __future__ import annotations

import math
import types
from typing import Any, Union, get_args, get_origin


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond a float's range
        return False


def fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type `hint` (str, int, float: finite, bool, None, unions, dict, list)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is dict:
        return isinstance(value, dict) and all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(fits(x, args[0]) for x in value)
    return True  # Any, and nested reports (built and checked on their own)
