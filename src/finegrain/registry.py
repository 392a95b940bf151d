"""One registry per kind of part (backbone, task, loss, dataset, ...).

A registry maps a name to a builder. Registering a name twice is an error; looking up an
unknown name raises ``ValueError`` listing what exists and the closest matches.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def close_matches(name: str, choices: list[str], n: int = 3) -> list[str]:
    """Return up to ``n`` entries of ``choices`` that look like ``name``."""
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]


class Registry(Generic[T]):
    """A named table of builders.

    Args:
        kind: what the registry holds ("dataset", "task", ...), used in error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the entry called ``name``, or raise ``ValueError`` with close matches."""
        try:
            return self._items[name]
        except KeyError:
            hint = close_matches(name, list(self._items))
            msg = f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}"
            if hint:
                msg += f". Did you mean {' or '.join(repr(h) for h in hint)}?"
            raise ValueError(msg) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
