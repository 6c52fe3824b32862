"""flawmap: unsupervised visual anomaly detection and localization.

>>> import flawmap
>>> model = flawmap.create_model("patchcore", coreset_fraction=0.1)   # doctest: +SKIP
>>> model.fit("bottle/").save("bottle-model")                        # doctest: +SKIP
>>> flawmap.load("bottle-model", device="cpu").predict("photo.png")[0].score   # doctest: +SKIP
>>> flawmap.load("bottle.onnx").predict("photo.png")[0].score        # doctest: +SKIP

Importing flawmap imports nothing heavy: the names are imported on first use, so the torch-free
install (``flawmap[runtime]``) can load and run exported models without torch (``AnomalyModel``,
``PatchCore``, ``create_model``, ``list_methods`` need it), and ``flawmap --help`` answers at once.
"""

from importlib import import_module
from typing import Any

from flawmap._version import __version__
from flawmap.errors import FlawmapError

_TORCH_NAMES = ("AnomalyModel", "PatchCore", "create_model", "list_methods")
#: The other names, by the module that holds them.
_LAZY_NAMES = {"load": "flawmap.loading", "Prediction": "flawmap.prediction", "Runtime": "flawmap.runtime"}

__all__ = ["AnomalyModel", "FlawmapError", "PatchCore", "Prediction", "Runtime", "__version__", "create_model", "list_methods", "load"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(import_module(_LAZY_NAMES[name]), name)
    if name not in _TORCH_NAMES:
        raise AttributeError(f"module 'flawmap' has no attribute {name!r}")
    try:
        from flawmap import models
    except ImportError as error:
        from flawmap.loading import missing_torch_error

        raise ImportError(str(missing_torch_error(f"flawmap.{name}", error))) from error
    return getattr(models, name)
