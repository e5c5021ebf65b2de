"""The Python API's arguments checked as the command line checks its options: every public function decorated with
`checked` (and every settings dataclass calling `check_fields` in its `__post_init__`) refuses an argument whose
type its annotation does not allow, or an integer outside its `Range`, with one LoramixError naming the function
and the argument, before any work is done. A truthy string ("no", "false") is never taken for a bool, a dtype
name never reaches torch as a device string.

Imports nothing of loramix but its errors, so that any module may use it."""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import math
import numbers
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin

from .errors import LoramixError

F = TypeVar("F", bound=Callable[..., Any])
MAX_SEED = 2**63 - 1  # seeds go to numpy (non-negative) and torch (at most 2**64 - 1), some plus a small offset


def check_seed(where: str, seed: Any) -> None:
    """Refuse a seed numpy's and torch's generators cannot both take (negative, or beyond MAX_SEED)."""
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= MAX_SEED:
        raise LoramixError(f"{where}seed must be in [0, {MAX_SEED}], got {seed}")


@dataclasses.dataclass(frozen=True)
class Range:
    """`Annotated[int, Range(low, high)]`: a whole number in [low, high] (high None: no upper bound)."""

    low: int | None = None
    high: int | None = None

    def why(self, value: Any) -> str | None:
        if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
        if self.low is not None and value < self.low:
            return f"must be at least {self.low}, got {value!r}"
        if self.high is not None and value > self.high:
            return f"must be at most {self.high:,}, got {value!r}"
        return None


def finite(value: Any) -> bool:
    """Whether a real number is finite: an integer beyond a float's range is not (math.isfinite would raise)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def matches(value: Any, hint: Any) -> bool:
    """Whether `value` has the type `hint` allows: unions, Optional, Literal, bool (a bool only), int (an integer,
    not a bool), float (a finite real number, not a bool), str, Path (any os.PathLike), containers (dict, list,
    tuple, Sequence, Mapping: their items too), Callable, classes (isinstance); what it cannot judge (Any, TypeVars,
    strings it could not resolve) passes."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is typing.Annotated:
        return matches(value, args[0])
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is Any or isinstance(hint, (TypeVar, str)) or hint is inspect.Parameter.empty:
        return True
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool too
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"
    if hint is float:
        return (isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"
                and finite(value))
    if hint is str:
        return isinstance(value, str)
    if hint is Path or (isinstance(hint, type) and issubclass(hint, os.PathLike)):
        return isinstance(value, os.PathLike)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, collections.abc.Mapping) and (not args or all(
            matches(k, args[0]) and matches(v, args[1]) for k, v in value.items()))
    if origin in (list, collections.abc.Sequence, collections.abc.Iterable):
        if origin is list and not isinstance(value, list):
            return False
        if origin is not list and (isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Iterable)):
            return False
        if not isinstance(value, (list, tuple)):  # an array or a generator: its items are not walked
            return True
        return not args or all(matches(x, args[0]) for x in value)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(x, args[0]) for x in value)
        return not args or (len(args) == len(value) and all(matches(x, a) for x, a in zip(value, args)))
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value)
    if origin is type:
        return isinstance(value, type)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe(hint: Any) -> str:
    """The type `hint` written for a message: 'int or None', 'str or Path', "'full'", 'dict[str, float]'."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is typing.Annotated:
        return describe(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if hint is None or hint is type(None):
        return "None"
    if hint is float:
        return "a finite number"
    if origin is not None:
        inner = ", ".join(describe(a) for a in args if a is not Ellipsis)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{inner}]" if inner else name
    if isinstance(hint, type):
        return "a dtype (torch.dtype)" if hint.__module__ == "torch" and hint.__name__ == "dtype" else hint.__name__
    return str(hint)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _ranges(hint: Any) -> list[Range]:
    out = []
    if get_origin(hint) is typing.Annotated:
        out += [m for m in get_args(hint)[1:] if isinstance(m, Range)]
    for a in get_args(hint) if get_origin(hint) in (Union, types.UnionType) else ():
        out += _ranges(a)
    return out


def check_value(where: str, name: str, value: Any, hint: Any) -> None:
    """Refuse `value` for argument / field `name` of `where` unless it fits `hint` (and its Range)."""
    if not matches(value, hint):
        if isinstance(value, (int, float)) and not finite(value) and matches(0.0, hint):
            raise LoramixError(f"{where}: {name} must be finite, got {value}")
        raise LoramixError(f"{where}: {name} must be {describe(hint)}, got {_shown(value)}")
    for r in _ranges(hint):
        if (why := r.why(value)) is not None:
            raise LoramixError(f"{where}: {name} {why}")


def _resolved_hints(fn: Callable) -> dict[str, Any]:
    """fn's annotations resolved (Annotated kept); one that does not resolve (a name imported only for type checking)
    is left out, so it is not checked."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001 - a forward reference that does not resolve
        pass
    out = {}
    glb = getattr(fn, "__globals__", None) or vars(sys.modules.get(fn.__module__, object()))
    for name, ann in getattr(fn, "__annotations__", {}).items():
        try:
            out[name] = eval(ann, glb) if isinstance(ann, str) else ann  # noqa: S307 - the module's own annotations
        except Exception:  # noqa: BLE001
            continue
    return out


def checked(fn: F) -> F:
    """Decorator for a public function (or a class's __init__): its arguments are checked against its annotations at
    every call (see `matches`), as are arguments it does not take (one line, not a TypeError). The default of a
    parameter is trusted as it is."""
    sig = inspect.signature(fn)
    label = fn.__qualname__.removesuffix(".__init__")
    hints: dict[str, Any] | None = None

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal hints
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise LoramixError(f"{label}(): {e}") from None
        if hints is None:
            hints = _resolved_hints(fn)
        for name, value in bound.arguments.items():
            param = sig.parameters[name]
            if name in ("self", "cls") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if name in hints and value is not param.default:
                check_value(f"{label}()", name, value, hints[name])
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_fields(obj: Any) -> None:
    """For a dataclass's __post_init__: refuse a field whose value its annotation does not allow (and its Range),
    naming the class and the field."""
    cls = type(obj)
    hints = _field_hints(cls)
    for f in dataclasses.fields(obj):
        if f.name in hints:
            check_value(cls.__name__, f.name, getattr(obj, f.name), hints[f.name])


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return _resolved_hints(cls)
