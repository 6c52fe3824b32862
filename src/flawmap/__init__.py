"""flawmap: unsupervised visual anomaly detection and localization.

>>> import flawmap
>>> model = flawmap.create_model("patchcore", coreset_fraction=0.1)   # doctest: +SKIP
>>> model.fit("bottle/").save("bottle-model")                        # doctest: +SKIP
>>> flawmap.load("bottle-model").predict("photo.png")[0].score       # doctest: +SKIP
"""

__version__ = "0.1.0"

from flawmap.errors import FlawmapError  # noqa: E402
from flawmap.io import load_model as load  # noqa: E402
from flawmap.models import AnomalyModel, PatchCore, Prediction, create_model, list_methods  # noqa: E402

__all__ = ["AnomalyModel", "FlawmapError", "PatchCore", "Prediction", "create_model", "list_methods", "load"]
