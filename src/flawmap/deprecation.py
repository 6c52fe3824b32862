"""Former names, accepted for one release with a :class:`FutureWarning` naming the new one.

Renamed after 0.2.0 (README, "Renamed"): the engine that runs a saved model, ``runtime=`` / ``--runtime``,
is ``backend=`` / ``--backend`` (``Runtime`` is the device settings); export's weight storage,
``precision=`` / ``export --precision``, is ``weight_dtype=`` / ``export --weight-dtype``
(``precision`` is the arithmetic everywhere else).
"""

from __future__ import annotations

import warnings
from typing import TypeVar

from flawmap.errors import FlawmapError

T = TypeVar("T")


def renamed(old_name: str, old_value: T | None, new_name: str, new_value: T, default: T) -> T:
    """The value of a parameter renamed from ``old_name`` to ``new_name``: ``old_value`` when it
    was given (with a FutureWarning), else ``new_value``; FlawmapError if both were given."""
    if old_value is None:
        return new_value
    if new_value != default:
        raise FlawmapError(f"give {new_name} only ({old_name} is its former name)")
    warn_renamed(old_name, new_name)
    return old_value


def warn_renamed(old_name: str, new_name: str) -> None:
    """The FutureWarning for a use of ``old_name``, now ``new_name``."""
    warnings.warn(f"{old_name} is deprecated and goes in the next release; use {new_name}", FutureWarning, stacklevel=4)
