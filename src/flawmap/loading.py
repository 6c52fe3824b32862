"""``flawmap.load``: a saved model of either kind, and the check that torch is installed.

A model directory (``model.save``) runs with torch (the ``flawmap[torch]`` extra); an exported
``.onnx`` file (``flawmap export``) needs only onnxruntime (``flawmap[runtime]``). Both load into
a :class:`flawmap.prediction.Predictor`, so what follows does not depend on the kind.

``backend="onnx"`` on a model directory runs the export ``flawmap export MODEL_DIR`` wrote into it
(``MODEL_DIR/model.onnx``), after checking it was exported from exactly that directory's content,
so a model refitted or updated since its export is never run from the stale graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flawmap.deprecation import renamed
from flawmap.errors import FlawmapError
from flawmap.onnx_model import load_onnx
from flawmap.prediction import Predictor

#: The engine that runs a model: ``auto`` = torch for a model directory, onnxruntime for an ``.onnx`` file.
BACKENDS = ("auto", "torch", "onnx")
#: Where ``flawmap export MODEL_DIR`` writes by default, and where ``backend="onnx"`` looks.
EXPORT_FILE = "model.onnx"


def load(path: str | Path, backend: str = "auto", *, runtime: str | None = None, **runtime_settings: Any) -> Predictor:
    """Load a model: a model directory (torch) or an exported ``.onnx`` file (onnxruntime).

    ``backend``: one of :data:`BACKENDS`; ``"onnx"`` with a model directory runs its export
    ``MODEL_DIR/model.onnx``. ``runtime_settings`` (``device``, ``precision``, ``batch_size``,
    ``num_workers``, ``progress``) choose how it runs here; an exported model takes only
    ``precision="auto"``. ``runtime``: the former name of ``backend`` (FutureWarning).

    >>> flawmap.load("bottle-model").predict("photo.png")[0].score          # doctest: +SKIP
    >>> flawmap.load("bottle-model", backend="onnx").predict("photo.png")    # doctest: +SKIP
    >>> flawmap.load("bottle.onnx", device="cuda").predict("photo.png")       # doctest: +SKIP
    """
    backend = renamed("runtime=", runtime, "backend=", backend, "auto")
    if backend not in BACKENDS:
        raise FlawmapError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    source = Path(path)
    if source.is_file():
        if backend == "torch":
            raise FlawmapError(f"{source}: an exported .onnx file runs with onnxruntime only; give its model directory to run it with torch")
        return load_onnx(source, **runtime_settings)
    if not source.exists():
        raise FlawmapError(f"{source}: no such model directory or .onnx file")
    if backend == "onnx":
        return _load_current_export(source, runtime_settings)
    require_torch(f"loading the model directory {source}")
    from flawmap.models.persistence import load_model

    return load_model(source, **runtime_settings)


def _load_current_export(model_dir: Path, runtime_settings: dict[str, Any]) -> Predictor:
    """``model_dir/model.onnx``, checked to be an export of the directory's present content."""
    from flawmap import io

    exported = model_dir / EXPORT_FILE
    if not exported.is_file():
        raise FlawmapError(f"{model_dir}: no {EXPORT_FILE} to run with onnxruntime; write it with: flawmap export {model_dir}")
    model = load_onnx(exported, **runtime_settings)
    if model.metadata["source_sha256"] != io.model_directory_digest(model_dir):
        raise FlawmapError(
            f"{exported}: exported from an earlier state of {model_dir} (refitted or updated since); "
            f"export it again with: flawmap export {model_dir}"
        )
    return model


def require_torch(what: str) -> None:
    """Raise a one-line FlawmapError naming the extra to install unless flawmap's torch part imports."""
    try:
        import flawmap.models  # noqa: F401  (torch, safetensors, the packaged backbone weights)
    except ImportError as error:
        raise missing_torch_error(what, error) from None


def missing_torch_error(what: str, error: ImportError) -> FlawmapError:
    """The error for ``what`` needing the torch extra, which failed to import with ``error``."""
    return FlawmapError(f'{what} needs the torch extra ({error}): pip install "flawmap[torch]"')
