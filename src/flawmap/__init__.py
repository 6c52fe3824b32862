"""flawmap: unsupervised visual anomaly detection and localization.

>>> import flawmap
>>> model = flawmap.create_model("patchcore", coreset_fraction=0.1)   # doctest: +SKIP
>>> model.fit("bottle/").save("bottle-model")                        # doctest: +SKIP
>>> flawmap.load("bottle-model", device="cpu").predict("photo.png")[0].score   # doctest: +SKIP
>>> flawmap.load("bottle.onnx").predict("photo.png")[0].score        # doctest: +SKIP

Importing flawmap does not import torch: the names that need it (``AnomalyModel``,
``PatchCore``, ``create_model``, ``list_methods``) are imported on first use, so the torch-free
install (``flawmap[runtime]``) can load and run exported models.
"""

from typing import Any

from flawmap._version import __version__
from flawmap.errors import FlawmapError
from flawmap.loading import load, missing_torch_error
from flawmap.prediction import Prediction
from flawmap.runtime import Runtime

_TORCH_NAMES = ("AnomalyModel", "PatchCore", "create_model", "list_methods")

__all__ = ["AnomalyModel", "FlawmapError", "PatchCore", "Prediction", "Runtime", "__version__", "create_model", "list_methods", "load"]


def __getattr__(name: str) -> Any:
    if name not in _TORCH_NAMES:
        raise AttributeError(f"module 'flawmap' has no attribute {name!r}")
    try:
        from flawmap import models
    except ImportError as error:
        raise ImportError(str(missing_torch_error(f"flawmap.{name}", error))) from error
    return getattr(models, name)
