"""Anomaly-detection methods: one module each, registered by name in :data:`METHODS`."""

import dataclasses
from typing import Any

from flawmap import search_faiss  # noqa: F401  (registers the faiss search backends)
from flawmap.errors import FlawmapError

from flawmap.models.base import AnomalyModel
from flawmap.models.methods import METHODS, register_method

from flawmap.models.scorer import PatchScores, Scorer
from flawmap.models.persistence import load_model
from flawmap.models.deepsvdd import DeepSVDD
from flawmap.models.fyd import Fyd
from flawmap.models.mkd import MKD
from flawmap.models.padim import Padim
from flawmap.models.patchcore import PatchCore
from flawmap.models.rlr import RLR
from flawmap.models.sfr import SFR
from flawmap.models.spade import Spade
from flawmap.models.students import UninformedStudents
from flawmap.prediction import Prediction
from flawmap.runtime import Runtime

__all__ = [
    "METHODS", "MKD", "AnomalyModel", "DeepSVDD", "Fyd", "Padim", "PatchCore", "PatchScores", "Prediction", "RLR", "SFR", "Scorer",
    "Spade", "UninformedStudents",
    "create_model", "list_methods", "load_model", "register_method",
]


def create_model(method: str, *, runtime: Runtime | None = None, **params: Any) -> AnomalyModel:
    """A new, unfitted model of the registered ``method`` with the given hyper-parameters.

    ``runtime`` chooses how it runs (device, precision, ...); it is not a hyper-parameter.
    """
    model_class = METHODS.get(method)
    names = [field.name for field in dataclasses.fields(model_class) if field.init]
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise FlawmapError(f"method {method!r} has no hyper-parameter {unknown[0]!r}; it has: {', '.join(names)}")
    model = model_class(**params)
    return model.set_runtime(runtime) if runtime is not None else model


def list_methods() -> list[str]:
    """Registered method names."""
    return METHODS.names()
