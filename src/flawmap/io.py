"""Model directories: ``config.json`` (method, hyper-parameters, fitted scalars) and tensors in
safetensors files. Loading parses JSON and raw tensors only, so it never executes code.

Layout::

    MODEL_DIR/
      config.json                  {"format": "flawmap-model", "format_version": 1,
                                    "method": ..., "params": {...}, "fitted": {...},
                                    "files": {"model": ..., "backbone": ... or null}}
      model-<hash>.safetensors     the method's fitted tensors
      backbone-<hash>.safetensors  only when the backbone came from a local weights file

Saving is atomic: tensor files are written under new content-addressed names first, then
``config.json``, which names them, is replaced in one rename, and only then are files no config
refers to removed. A crash at any point leaves either the old or the new model, complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
import torch
from safetensors.torch import load_file, save

from flawmap import __version__
from flawmap.errors import FlawmapError

if TYPE_CHECKING:
    from flawmap.models.base import AnomalyModel

FORMAT_NAME = "flawmap-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"


def save_model(model: "AnomalyModel", directory: str | Path) -> Path:
    """Write a fitted model to ``directory`` atomically; returns the directory."""
    target = Path(directory)
    if target.exists() and not (target / CONFIG_FILE).is_file():
        if not target.is_dir() or any(target.iterdir()):
            raise FlawmapError(f"{target}: exists and is not a flawmap model directory; refusing to overwrite it")
    target.mkdir(parents=True, exist_ok=True)
    files = {"model": write_tensor_file(target, "model", model._state()), "backbone": None}
    if model.weights is not None:
        files["backbone"] = write_tensor_file(target, "backbone", model.backbone_.state_dict())
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "flawmap_version": __version__,
        "method": model.method,
        "params": model.get_params(),  # tuples become JSON lists; load_model turns taps back
        "fitted": model._fitted_scalars(),
        "files": files,
    }
    write_atomically(target / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    for stale in target.glob("*.safetensors"):
        if stale.name not in files.values():
            stale.unlink()
    return target


def load_model(directory: str | Path) -> "AnomalyModel":
    """Load a model directory written by :func:`save_model`."""
    from flawmap.models import METHODS

    source = Path(directory)
    config = read_config(source)
    model_class = METHODS.get(config["method"])
    params = dict(config["params"])
    if params.get("taps") is not None:
        params["taps"] = tuple(params["taps"])
    if config["files"]["backbone"] is not None:
        params["weights"] = str(source / config["files"]["backbone"])
    try:
        model = model_class(**params)
    except TypeError as error:
        raise FlawmapError(f"{source / CONFIG_FILE}: parameters do not match method {config['method']!r}: {error}") from None
    for name, value in config["fitted"].items():
        setattr(model, name, tuple(value) if name == "taps_" else value)
    model.backbone_ = model._build_backbone()
    model._set_state(_read_tensors(source / config["files"]["model"]))
    return model


def read_config(directory: Path) -> dict:
    """The validated ``config.json`` of a model directory."""
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FlawmapError(f"{directory}: model directory not found")
    if not config_path.is_file():
        raise FlawmapError(f"{directory}: not a flawmap model (no {CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FlawmapError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise FlawmapError(f"{config_path}: not a flawmap model config")
    if config.get("format_version") != FORMAT_VERSION:
        raise FlawmapError(
            f"{config_path}: model format version {config.get('format_version')} is not supported "
            f"(this flawmap reads version {FORMAT_VERSION})"
        )
    for key in ("method", "params", "fitted", "files"):
        if key not in config:
            raise FlawmapError(f"{config_path}: missing key {key!r}")
    return config


def write_tensor_file(folder: Path, stem: str, tensors: dict[str, torch.Tensor]) -> str:
    """Save ``tensors`` as ``<stem>-<content hash>.safetensors`` in ``folder``; returns the name."""
    payload = save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()})
    name = f"{stem}-{hashlib.sha256(payload).hexdigest()[:16]}.safetensors"
    if not (folder / name).is_file():
        write_atomically(folder / name, payload)
    return name


def write_atomically(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary sibling, flush it to disk, then rename it onto ``path``."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_tensors(path: Path) -> dict:
    if not path.is_file():
        raise FlawmapError(f"{path}: missing tensor file; the model directory is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise FlawmapError(f"{path}: cannot read tensors ({error})") from None
