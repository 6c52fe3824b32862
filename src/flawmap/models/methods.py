"""The registry of methods: each method module registers its estimator class by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flawmap.registry import Registry

if TYPE_CHECKING:
    from flawmap.models.base import AnomalyModel

METHODS: Registry[type[AnomalyModel]] = Registry("method")


def register_method(name: str):
    """Class decorator: register a method under ``name`` (its CLI ``--method`` value)."""

    def decorator(cls: type[AnomalyModel]) -> type[AnomalyModel]:
        cls.method = name
        return METHODS.register(name)(cls)

    return decorator
