"""One registry per kind of part (backbone, task, loss, dataset, ...).

A registry maps a name to a builder. Registering a name twice is an error; looking up an
unknown name raises ``ValueError`` listing what exists and the closest matches.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

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
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, **info: Any) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name`` (default: its ``__name__``).

        ``info`` is kept beside the entry (e.g. how a data set reader recognises its layout) and
        read back with :meth:`info`.
        """

        def deco(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            self._info[key] = info
            return obj

        return deco

    def add(self, name: str, obj: T, **info: Any) -> T:
        """Register ``obj`` under ``name`` (the non-decorator form)."""
        return self.register(name, **info)(obj)

    def info(self, name: str) -> dict[str, Any]:
        """What was registered beside entry ``name`` (an empty dict if nothing)."""
        self.get(name)
        return dict(self._info[name])

    def check(self, name: str, flag: str) -> None:
        """Raise ``ValueError`` naming ``flag`` when ``name`` is not registered (for config checks)."""
        if name not in self._items:
            hint = close_matches(name, list(self._items))
            msg = f"{flag} must be one of {', '.join(self.names())}, got {name!r}"
            raise ValueError(msg + (f". Did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""))

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
