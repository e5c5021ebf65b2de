"""A name -> implementation registry, one per pipeline stage (signatures, distances, operators, composition, ...),
and the parameters a registered variant declares (`Param`, checked by `options`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, TypeVar

from .errors import LoramixError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to implementations; `register(name)` is a decorator, `get(name)` a checked lookup."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise LoramixError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


@dataclass(frozen=True)
class Param:
    """A numeric parameter a registered variant declares (its `parameters`): default, help text, inclusive bounds
    (`low`, `high`; `above`: strictly greater than it) and `whole` (an integer)."""

    default: float
    help: str
    low: float | None = None
    high: float | None = None
    above: float | None = None
    whole: bool = False

    def check(self, name: str, value: Any) -> float:
        """`value` as this parameter's type, refused in one line when outside its bounds."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (not self.whole or float(value).is_integer())
        ok = ok and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
        ok = ok and (self.above is None or value > self.above)
        if not ok:
            bounds = [f">= {self.low:g}" if self.low is not None else "", f"> {self.above:g}" if self.above is not None else "",
                      f"<= {self.high:g}" if self.high is not None else ""]
            want = ("a whole number" if self.whole else "a finite number") + "".join(f" {b}" for b in bounds if b)
            raise LoramixError(f"parameter '{name}' must be {want}, got {value!r}")
        return int(value) if self.whole else float(value)


def options(kind: str, name: str, declared: Mapping[str, Param], given: Mapping[str, Any] | None) -> dict[str, float]:
    """Every parameter the {kind} `name` declares: `given` (each checked against its declaration) or its default;
    a parameter it does not declare is refused in one line naming those it has."""
    given = dict(given or {})
    if unknown := sorted(set(given) - set(declared)):
        has = ", ".join(declared) or "none"
        raise LoramixError(f"{kind} '{name}' has no parameter {', '.join(map(repr, unknown))} (its parameters: {has})")
    try:
        return {k: p.check(k, given[k]) if k in given else p.default for k, p in declared.items()}
    except LoramixError as e:
        raise LoramixError(f"{kind} '{name}': {e.template}") from None
