"""A small decorator registry, used for backbones and methods (in the manner of timm's).

>>> animals = Registry("animal")
>>> @animals.register("cat")
... def make_cat():
...     return "meow"
>>> animals.get("cat")()
'meow'
>>> animals.names()
['cat']
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Callable, Generic, TypeVar

from flawmap.errors import FlawmapError

EntryT = TypeVar("EntryT", bound=Callable)


class Registry(Generic[EntryT]):
    """Maps names to factories. ``kind`` names the things registered, for error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, EntryT] = {}

    def register(self, name: str) -> Callable[[EntryT], EntryT]:
        """Decorator: register the decorated factory under ``name``."""

        def decorator(factory: EntryT) -> EntryT:
            if name in self._entries:
                warnings.warn(f"{self.kind} {name!r} registered twice; the later one wins", stacklevel=2)
            self._entries[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> EntryT:
        """The factory registered as ``name``; raises FlawmapError listing the choices if unknown."""
        try:
            return self._entries[name]
        except KeyError:
            choices = ", ".join(self.names())
            raise FlawmapError(f"unknown {self.kind} {name!r}; choose one of: {choices}") from None

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching the shell-style wildcard ``pattern``."""
        return sorted(name for name in self._entries if fnmatch.fnmatch(name, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries
