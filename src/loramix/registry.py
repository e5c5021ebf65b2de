"""A name -> implementation registry, one per pipeline stage (signatures, distances, operators, composition)."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

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
