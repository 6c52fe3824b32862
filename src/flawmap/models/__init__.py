"""Anomaly-detection methods: one module each, registered by name in :data:`METHODS`."""

from flawmap.models.base import METHODS, AnomalyModel, PatchScores, Prediction, register_method
from flawmap.models.padim import Padim
from flawmap.models.patchcore import PatchCore
from flawmap.models.rlr import RLR
from flawmap.models.sfr import SFR
from flawmap.models.spade import Spade

__all__ = ["METHODS", "AnomalyModel", "Padim", "PatchCore", "PatchScores", "Prediction", "RLR", "SFR", "Spade", "create_model", "list_methods", "register_method"]


def create_model(method: str, **params) -> AnomalyModel:
    """A new, unfitted model of the registered ``method`` with the given hyper-parameters."""
    return METHODS.get(method)(**params)


def list_methods() -> list[str]:
    """Registered method names."""
    return METHODS.names()
