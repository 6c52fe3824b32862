"""flawmap: unsupervised visual anomaly detection and localization.

>>> import flawmap
>>> model = flawmap.create_model("patchcore", coreset_fraction=0.1)   # doctest: +SKIP
>>> model.fit("bottle/").save("bottle-model")                        # doctest: +SKIP
>>> flawmap.load("bottle-model", device="cpu").predict("photo.png")[0].score   # doctest: +SKIP
"""

from flawmap._version import __version__
from flawmap.errors import FlawmapError
from flawmap.models import AnomalyModel, PatchCore, Prediction, create_model, list_methods, load_model as load
from flawmap.runtime import Runtime

__all__ = ["AnomalyModel", "FlawmapError", "PatchCore", "Prediction", "Runtime", "__version__", "create_model", "list_methods", "load"]
