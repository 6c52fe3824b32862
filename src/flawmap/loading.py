"""``flawmap.load``: a saved model of either kind, and the check that torch is installed.

A model directory (``model.save``) needs torch (the ``flawmap[torch]`` extra); an exported
``.onnx`` file (``flawmap export``) needs only onnxruntime (``flawmap[runtime]``). Both load into
a :class:`flawmap.prediction.Predictor`, so what follows does not depend on the kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flawmap.errors import FlawmapError
from flawmap.onnx_model import load_onnx
from flawmap.prediction import Predictor


def load(path: str | Path, **runtime_settings: Any) -> Predictor:
    """Load a model: a model directory (torch) or an exported ``.onnx`` file (onnxruntime).

    ``runtime_settings`` (``device``, ``precision``, ``batch_size``, ``num_workers``,
    ``progress``) choose how it runs here; an exported model takes only ``precision="auto"``.

    >>> flawmap.load("bottle-model").predict("photo.png")[0].score          # doctest: +SKIP
    >>> flawmap.load("bottle.onnx", device="cuda").predict("photo.png")       # doctest: +SKIP
    """
    source = Path(path)
    if source.is_file():
        return load_onnx(source, **runtime_settings)
    if not source.exists():
        raise FlawmapError(f"{source}: no such model directory or .onnx file")
    require_torch(f"loading the model directory {source}")
    from flawmap.models.base import load_model

    return load_model(source, **runtime_settings)


def require_torch(what: str) -> None:
    """Raise a one-line FlawmapError naming the extra to install unless flawmap's torch part imports."""
    try:
        import flawmap.models  # noqa: F401  (torch, safetensors, the packaged backbone weights)
    except ImportError as error:
        raise missing_torch_error(what, error) from None


def missing_torch_error(what: str, error: ImportError) -> FlawmapError:
    """The error for ``what`` needing the torch extra, which failed to import with ``error``."""
    return FlawmapError(f'{what} needs the torch extra ({error}): pip install "flawmap[torch]"')
