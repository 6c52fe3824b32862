"""The on-disk format: a JSON document plus named groups of tensors in safetensors files.

This module is a pure format layer: documents and tensors in, documents and tensors out. It
knows nothing about methods (``flawmap.models`` builds models from what it reads, and imports
it, never the other way round). Loading parses JSON and raw tensors only, so it never executes
code.

A *record* is one JSON document in a folder naming one content-addressed tensor file per group::

    FOLDER/
      <document>.json               {..., "files": {"<group>": "<group>-<hash>.safetensors", ...}}
      <group>-<hash>.safetensors    one per group

Writing is atomic: the tensor files are written under new content-addressed names first, then
the document, which names them, replaces the old one in one rename, and only then are files of
those groups that the document no longer names removed. A crash at any point leaves the old or
the new record, complete. Model directories and training checkpoints are both records.

A model directory is a record whose document is ``config.json``::

    {"format": "flawmap-model", "format_version": 8, "flawmap_version": ...,
     "method": ..., "params": {...}, "fitted": {...}, "saved_with": {...}, "files": {...}}

``saved_with`` says where the model was fitted (device, torch version), for information only:
loading never reads it.

torch and safetensors are imported by the functions that read or write tensors, so that the
torch-free runtime can name a model directory's exact content (:func:`model_directory_digest`).
"""

from __future__ import annotations

import hashlib
import json
import os
import math
import tempfile
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from flawmap._version import __version__
from flawmap.errors import FlawmapError

FORMAT_NAME = "flawmap-model"
FORMAT_VERSION = 8  # 3: out-of-sample calibration records (calibration_, map maxima and medians); 4: tiling parameters; 5: SFR subspaces; 6: SFR affine; 7: MKD scored taps, FYD projector and chained FCA, students' patch teacher; 8: training-image digests and calibration history
CONFIG_FILE = "config.json"
#: Format versions this flawmap reads. Configs of an older version lack the hyper-parameters
#: added since, which then take their defaults (defaults that keep the old behaviour: version 3
#: predates tiling and the faiss searches, version 4 SFR's reconstruction, n_subspaces, subspace_dim),
#: or the value a method's ``former_params`` names (version 5 predates SFR's affine term, 0 then;
#: version 6 MKD's ``scored_taps`` and ``smoothgrad_samples``, whose defaults keep its behaviour,
#: and the students' teacher and validation split: the backbone teacher and none then).
#: An aligned FYD model of version 6 or before (no projector) cannot be read: it is to be refitted.
#: Fitted values added since (version 8: training-image digests, calibration history) load as
#: unrecorded (``flawmap.models.persistence.FORMER_FITTED``).
READABLE_VERSIONS = (3, 4, 5, 6, 7, FORMAT_VERSION)
#: Top-level keys every model config has besides the format fields.
MODEL_KEYS = ("method", "params", "fitted", "files")

if TYPE_CHECKING:
    import torch

    TensorGroups = dict[str, dict[str, torch.Tensor]]


# ---------------------------------------------------------------------------- model directories
def save_model_directory(directory: str | Path, document: dict[str, Any], groups: TensorGroups) -> Path:
    """Write a model record (``config.json`` + one tensor file per group) atomically.

    ``document`` holds ``method``, ``params``, ``fitted`` and anything else JSON-serialisable;
    the format fields and ``files`` are added here. Refuses to write into a folder that holds
    anything but a flawmap model.
    """
    target = Path(directory)
    check_model_target(target)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "flawmap_version": __version__}
    write_record(target, CONFIG_FILE, {**header, **document}, groups)
    return target


def check_model_target(directory: Path) -> None:
    """FlawmapError unless ``directory`` can receive a model: absent, an empty folder or a model
    directory (:mod:`flawmap.outputs`: checked before a fit, not after it)."""
    from flawmap.outputs import check_writable

    if directory.exists() and not (directory / CONFIG_FILE).is_file():
        if not directory.is_dir() or any(directory.iterdir()):
            raise FlawmapError(f"{directory}: exists and is not a flawmap model directory; refusing to overwrite it")
    check_writable(directory, folder=True)


def read_model_directory(directory: str | Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """The validated ``config.json`` of a model directory and its tensor files by group."""
    source = Path(directory)
    if source.is_file():
        hint = "an exported model, which runs with predict, evaluate, score, report and serve" if source.suffix == ".onnx" else "not a model"
        raise FlawmapError(f"{source}: is a file ({hint}); this needs a model directory (`flawmap fit --out DIR`)")
    if not source.is_dir():
        raise FlawmapError(f"{source}: model directory not found")
    config_path = source / CONFIG_FILE
    if not config_path.is_file():
        raise FlawmapError(f"{source}: not a flawmap model (no {CONFIG_FILE})")
    document, groups = read_record(source, CONFIG_FILE)
    check_format(
        config_path, document, ("format", FORMAT_NAME), READABLE_VERSIONS, MODEL_KEYS,
        not_ours="not a flawmap model config", redo="fit the model again",
    )
    return document, groups


def check_format(
    where: Path,
    document: dict[str, Any],
    marker: tuple[str, Any],
    versions: Sequence[int],
    required: Sequence[str],
    *,
    not_ours: str,
    redo: str,
) -> None:
    """One-line FlawmapError naming ``where`` unless ``document`` carries ``marker`` (key, value),
    a ``format_version`` in ``versions`` and every key of ``required``; ``not_ours`` says what ``where``
    is not, ``redo`` how to make a readable one. Shared by model directories and ONNX exports."""
    key, value = marker
    if document.get(key) != value:
        raise FlawmapError(f"{where}: {not_ours}")
    if document.get("format_version") not in versions:
        raise FlawmapError(
            f"{where}: format version {document.get('format_version')} is not supported "
            f"(this flawmap reads versions {', '.join(map(str, versions))}); {redo} with this version"
        )
    missing = [name for name in required if name not in document]
    if missing:
        raise FlawmapError(f"{where}: missing key {missing[0]!r}")


def check_params(config_path: Path, params: Any, types: dict[str, Any]) -> dict[str, Any]:
    """``params`` checked against ``types`` (name -> type hint); FlawmapError naming ``config_path``
    for a missing, unknown or mistyped value. Returns the values with JSON ints of float
    parameters as floats."""
    return _check_section(config_path, "params", params, types)


def check_fitted(config_path: Path, fitted: Any, types: dict[str, Any]) -> dict[str, Any]:
    """``fitted`` with the keys of ``types`` checked (other keys are the method's, passed on)."""
    if not isinstance(fitted, dict):
        raise FlawmapError(f"{config_path}: 'fitted' must be an object, got {type(fitted).__name__}")
    checked = _check_section(config_path, "fitted", {k: v for k, v in fitted.items() if k in types}, types)
    return {**fitted, **checked}


def _check_section(config_path: Path, section: str, values: Any, types: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise FlawmapError(f"{config_path}: {section!r} must be an object, got {type(values).__name__}")
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise FlawmapError(f"{config_path}: unknown key {section}.{unknown[0]}")
    missing = sorted(set(types) - set(values))
    if missing:
        raise FlawmapError(f"{config_path}: missing key {section}.{missing[0]}")
    checked = {}
    for name, hint in types.items():
        value = _as_type(values[name], hint)
        if value is _MISMATCH:
            raise FlawmapError(
                f"{config_path}: {section}.{name} must be {_type_name(hint)}, got {json.dumps(values[name])[:40]}"
            )
        checked[name] = value
    return checked


_MISMATCH = object()


def _as_type(value: Any, hint: Any) -> Any:
    """``value`` (parsed JSON) as ``hint`` (int, float, str, bool, list, dict, tuple[X, ...],
    ``X | None``), or :data:`_MISMATCH`."""
    if hint is type(None):
        return None if value is None else _MISMATCH
    options = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for option in options:
            converted = _as_type(value, option)
            if converted is not _MISMATCH:
                return converted
        return _MISMATCH
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            return _MISMATCH
        items = [_as_type(item, options[0]) for item in value]
        return _MISMATCH if any(item is _MISMATCH for item in items) else tuple(items)
    if hint is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else _MISMATCH
    return value if isinstance(value, hint) else _MISMATCH


def _type_name(hint: Any) -> str:
    """A readable name of a type hint: ``int``, ``a list of str``, ``float or null``."""
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    options = typing.get_args(hint)
    if options and typing.get_origin(hint) is not tuple:
        return " or ".join(_type_name(option) for option in options)
    return "null" if hint is type(None) else hint.__name__


def model_directory_digest(directory: str | Path) -> str:
    """sha256 (hex) of a model directory's ``config.json`` and tensor files (in group order):
    names exactly which saved model something, such as an exported graph, was made from."""
    config_path = Path(directory) / CONFIG_FILE
    _, files = read_model_directory(directory)
    digest = hashlib.sha256(config_path.read_bytes())
    for group in sorted(files):
        digest.update(files[group].read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- records
def write_record(folder: str | Path, document_name: str, document: dict[str, Any], groups: TensorGroups) -> None:
    """Write ``document`` (plus ``files``) and one tensor file per group into ``folder`` atomically.

    Tensor files of the same groups (and of groups the previous document named) that the new
    document does not name are removed after the document is replaced.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    previous_groups = set(_previous_files(target / document_name))
    files = {group: write_tensor_file(target, group, tensors) for group, tensors in groups.items()}
    payload = json.dumps({**document, "files": files}, indent=1) + "\n"
    write_atomically(target / document_name, payload.encode("utf-8"))
    for group in previous_groups | set(files):
        for stale in target.glob(f"{group}-*.safetensors"):
            if stale.name != files.get(group):
                stale.unlink()


def read_record(folder: str | Path, document_name: str) -> tuple[dict[str, Any], dict[str, Path]]:
    """The JSON document ``folder/document_name`` and the tensor file of each group it names
    (checked to exist; read them with :func:`read_tensor_file`)."""
    path = Path(folder) / document_name
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise FlawmapError(f"{path}: cannot read ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FlawmapError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise FlawmapError(f"{path}: not a flawmap model config")
    files = document.get("files")
    if not isinstance(files, dict) or not all(isinstance(name, str) for name in files.values()):
        raise FlawmapError(f"{path}: missing or malformed key 'files'")
    paths = {group: Path(folder) / name for group, name in files.items()}
    for path in paths.values():
        if not path.is_file():
            raise FlawmapError(f"{path}: missing tensor file; the model directory is incomplete")
    return document, paths


def write_tensor_file(folder: Path, stem: str, tensors: dict[str, torch.Tensor]) -> str:
    """Save ``tensors`` as ``<stem>-<content hash>.safetensors`` in ``folder``; returns the name."""
    from safetensors.torch import save

    payload = save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()})
    name = f"{stem}-{hashlib.sha256(payload).hexdigest()[:16]}.safetensors"
    if not (folder / name).is_file():
        write_atomically(folder / name, payload)
    return name


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, on the CPU; FlawmapError naming the file if unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise FlawmapError(f"{path}: cannot read tensors ({error})") from None


def write_atomically(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary sibling, flush it to disk, then rename it onto ``path``
    (with the mode the umask gives new files, :mod:`flawmap.outputs`)."""
    from flawmap.outputs import set_umask_mode

    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        set_umask_mode(Path(temporary), folder=False)
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _previous_files(document_path: Path) -> dict[str, str]:
    """The ``files`` of the document about to be replaced (empty when absent or unreadable)."""
    try:
        files = json.loads(document_path.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}
