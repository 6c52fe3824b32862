"""Scoring many image files into one Parquet table (``flawmap score``), in this process or on Ray.

Two steps, the same in both engines::

    paths ──> decode_files (CPU: file -> uint8 H x W x 3, ──> ModelScorer (the model, loaded once: ──> Parquet
              or the error that stops it)                      Predictor.iter_predictions on the      row groups
                                                               batch; a bad image -> an error row)

- ``engine="local"`` runs them in this process: one batch is decoded (in a thread) while the
  previous one is scored. Needs pyarrow only.
- ``engine="ray"`` runs them with Ray Data: the path list is a dataset, ``decode_files`` runs in
  CPU tasks, ``ModelScorer`` in a fixed pool of actors (each loads the model once), and the
  driver iterates the scored rows in bounded batches into the Parquet file. Ray restarts a
  killed actor and retries its batch (``ACTOR_RESTARTS``), so no row is lost.

Memory stays bounded: the driver holds the path list and at most one row group of results,
never images or maps. A file that cannot be decoded, or an image the model refuses (smaller than
its patch grid), becomes a row with ``error`` set and the other columns null, never a lost
batch. The Parquet file is written beside its destination and renamed into place when complete.
Rows of the local engine come in input order; Ray's in whatever order batches finish.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import warnings
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from flawmap.data.datasets import Sample, output_names, samples_from_paths
from flawmap.data.images import read_image
from flawmap.deprecation import renamed
from flawmap.errors import FlawmapError
from flawmap.loading import load
from flawmap.outputs import check_replaceable, check_writable, set_umask_mode
from flawmap.prediction import Prediction
from flawmap.runtime import Runtime

ENGINES = ("local", "ray")

#: One row per input image. All but ``path`` and ``error`` are null on an error row;
#: ``map_path`` is null unless maps are written.
RESULT_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("score", pa.float64()),
    ("is_anomalous", pa.bool_()),
    ("threshold", pa.float64()),
    ("map_max", pa.float64()),
    ("map_mean", pa.float64()),
    ("map_path", pa.string()),
    ("pixel_threshold", pa.float64()),
    ("regions", pa.list_(pa.struct([
        ("box", pa.list_(pa.int32(), 4)), ("area_px", pa.int64()), ("peak_score", pa.float64()), ("mean_score", pa.float64()),
    ]))),
    ("error", pa.string()),
])

#: Rows per Parquet row group: what the driver buffers at most.
ROW_GROUP_ROWS = 4096
#: How often Ray restarts a dead model actor, and retries the batch it was scoring.
ACTOR_RESTARTS = 3


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide ``engine="ray"`` runs.

    Parameters
    ----------
    address : str or None
        A running Ray cluster to join (``ray start --head`` printed it; ``"auto"``: the one on
        this machine). None starts a local instance for the run (or uses the one this process
        already started with ``ray.init``).
    num_cpus : int or None
        CPUs of the local instance (default: all of this machine); not with ``address``.
    actors : int
        Model actors; each loads the model once and scores one batch at a time.
    cpus_per_actor : float
        CPUs reserved for each actor (its torch threads); on a GPU device each actor also
        reserves one GPU.
    """

    address: str | None = None
    num_cpus: int | None = None
    actors: int = 1
    cpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        if self.actors < 1 or self.cpus_per_actor <= 0:
            raise FlawmapError(f"actors must be at least 1 and cpus_per_actor above 0, got {self.actors} and {self.cpus_per_actor}")
        if self.address is not None and self.num_cpus is not None:
            raise FlawmapError("num_cpus sizes a local Ray instance; a cluster joined by its address has its own")


@dataclass(frozen=True)
class ScoreSummary:
    """What a run wrote: ``n_images`` rows, of which ``n_anomalous`` flagged and ``n_errors`` failed."""

    out: Path
    n_images: int
    n_anomalous: int
    n_errors: int


def score_files(
    model_path: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    engine: str = "local",
    backend: str = "auto",
    runtime: Runtime = Runtime(),
    maps_dir: str | Path | None = None,
    cluster: RaySettings = RaySettings(),
    force: bool = False,
    model_runtime: str | None = None,
) -> ScoreSummary:
    """Score every image of ``inputs`` with the model at ``model_path`` into the Parquet file ``out``.

    Parameters
    ----------
    model_path : a model directory or an exported ``.onnx`` file (anything :func:`flawmap.load`
        takes); with Ray it must be readable at the same path on every node.
    inputs : image files, folders (searched recursively) and ``.txt`` files listing one image
        file or folder per line (relative to the current folder).
    engine : ``"local"`` (this process) or ``"ray"``.
    backend : ``"auto"``, ``"torch"`` or ``"onnx"``, as for :func:`flawmap.load`.
    runtime : how the model runs; ``batch_size`` is also the decoding batch.
    maps_dir : if given, each anomaly map is saved as ``MAPS_DIR/<name>.npy`` (float32, the
        image's original ``H x W``), ``<name>`` its path below the inputs' common folder.
    cluster : the Ray cluster and its actors, for ``engine="ray"``.
    force : replace an existing ``out`` that is not a results table (:mod:`flawmap.outputs`).
    model_runtime : the former name of ``backend`` (FutureWarning).

    Raises
    ------
    FlawmapError
        For an unknown engine, inputs that do not exist or hold no images, a model that does not
        load, or Ray not installed; a bad image is an error row instead.
    """
    backend = renamed("model_runtime=", model_runtime, "backend=", backend, "auto")
    if engine not in ENGINES:
        raise FlawmapError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    check_replaceable(Path(out), folder=False, force=force, ours=is_results_table, what="a results table flawmap wrote")
    if maps_dir is not None:
        check_writable(Path(maps_dir), folder=True)
    paths = image_paths(inputs)
    map_paths = _map_paths(paths, maps_dir)
    scorer_args = {"model_path": os.path.abspath(model_path), "backend": backend, "runtime": asdict(runtime.replace(progress=False))}
    if engine == "local":
        tables = _local_tables(paths, map_paths, ModelScorer(**scorer_args), runtime.batch_size)
    else:
        _import_ray()
        if cluster.address is not None:
            _check_reachable(cluster.address)
        # a model that does not load fails here in one line, not in every actor (on the CPU: the
        # driver may have no GPU where the actors have one)
        load(scorer_args["model_path"], backend)
        tables = _ray_tables(paths, map_paths, scorer_args, runtime, cluster)
    return _write_rows(tables, Path(out), len(paths), progress=runtime.progress and engine == "local")  # Ray draws its own


def image_paths(inputs: Sequence[str | Path]) -> list[str]:
    """The absolute paths of the images named by ``inputs`` (see :func:`score_files`), in order."""
    expanded: list[Path] = []
    for item in map(Path, inputs):
        expanded += _listed_paths(item) if item.suffix.lower() == ".txt" and item.is_file() else [item]
    if not expanded:
        raise FlawmapError("no inputs given")
    return [os.path.abspath(sample.image_path) for sample in samples_from_paths(expanded, recursive=True)]


def _listed_paths(list_file: Path) -> list[Path]:
    """The paths in a text file, one a line; blank lines and lines starting with ``#`` skipped."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise FlawmapError(f"{list_file}: cannot read the list of images ({error})") from None
    return [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _map_paths(paths: list[str], maps_dir: str | Path | None) -> list[str]:
    """Where each image's map goes (absolute), or ``""`` each when no maps are written."""
    if maps_dir is None:
        return [""] * len(paths)
    root = Path(os.path.abspath(maps_dir))
    return [str(root / f"{name}.npy") for name in output_names([Path(path) for path in paths])]


# ---------------------------------------------------------------- the two steps
def decode_files(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Decode the files of a batch: ``path``, ``map_path`` (strings) pass through, ``pixels`` gets
    each image as ``uint8 H x W x 3`` (``0 x 0 x 3`` where it fails) and ``error`` the reason (``""``
    where it succeeds)."""
    pixels, errors = [], []
    for path in batch["path"]:
        try:
            pixels.append(read_image(path))
            errors.append("")
        except FlawmapError as error:
            pixels.append(np.zeros((0, 0, 3), dtype=np.uint8))
            errors.append(str(error))
    return {"path": batch["path"], "map_path": batch["map_path"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class ModelScorer:
    """Scores decoded batches (see :func:`decode_files`) with one model, loaded once: a Ray Data
    actor, or the local engine's scorer. Each batch becomes a table of :data:`RESULT_SCHEMA`.

    ``model_path`` and ``backend`` go to :func:`flawmap.load`; ``runtime`` holds the
    :class:`~flawmap.runtime.Runtime` settings as a dict.
    """

    def __init__(self, model_path: str, backend: str, runtime: dict[str, Any]) -> None:
        self.model = load(model_path, backend, **runtime)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        decoded = [index for index, error in enumerate(batch["error"]) if not error]
        images = [Sample(image_path=Path(batch["path"][i]), pixels=batch["pixels"][i]) for i in decoded]
        outcomes: dict[int, Prediction | FlawmapError] = dict(zip(decoded, self._predict(images)))
        rows = []
        for index, (path, map_path, error) in enumerate(zip(batch["path"], batch["map_path"], batch["error"])):
            outcome = outcomes.get(index)
            if isinstance(outcome, Prediction):
                rows.append(self._row(str(path), outcome, str(map_path)))
            else:
                reason = error or str(outcome)
                rows.append({"path": str(path), "error": reason})
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)

    def _predict(self, images: list[Sample]) -> list[Prediction | FlawmapError]:
        """Predictions for ``images`` (decoded: in-memory samples named by their file) in order: the batch at once, or, when an image fails, each
        image alone (so only that one becomes an error)."""
        try:
            return [prediction for prediction, _ in self.model.iter_predictions(images)]
        except FlawmapError as error:
            if len(images) == 1:
                return [error]
            return [outcome for image in images for outcome in self._predict([image])]

    def _row(self, path: str, prediction: Prediction, map_path: str) -> dict[str, Any]:
        """The result row of one image, writing its map to ``map_path`` unless that is empty."""
        anomaly_map = prediction.anomaly_map
        if map_path:
            Path(map_path).parent.mkdir(parents=True, exist_ok=True)
            np.save(map_path, anomaly_map.astype(np.float32, copy=False))
        return {
            "path": path, "score": prediction.score, "is_anomalous": prediction.is_anomalous,
            "threshold": float(self.model.threshold_), "map_max": float(anomaly_map.max()),
            "map_mean": float(anomaly_map.mean(dtype=np.float64)), "map_path": map_path or None,
            "pixel_threshold": float(self.model.map_high_), "regions": [region.to_json() for region in prediction.regions],
            "error": None,
        }


# ---------------------------------------------------------------- engines
def _local_tables(paths: list[str], map_paths: list[str], scorer: ModelScorer, batch_size: int) -> Generator[pa.Table, None, None]:
    """The local engine: decode one batch in a thread while the previous one is scored here."""
    batches = (
        {"path": np.array(paths[start:start + batch_size]), "map_path": np.array(map_paths[start:start + batch_size])}
        for start in range(0, len(paths), batch_size)
    )
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flawmap-read") as reader:
        ahead = None
        for batch in batches:
            following = reader.submit(decode_files, batch)
            if ahead is not None:
                yield scorer(ahead.result())
            ahead = following
        if ahead is not None:
            yield scorer(ahead.result())


def _ray_tables(
    paths: list[str], map_paths: list[str], scorer_args: dict[str, Any], runtime: Runtime, settings: RaySettings
) -> Generator[pa.Table, None, None]:
    """The Ray engine: decode in CPU tasks, score in a pool of model actors, stream the rows back."""
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=settings.address, num_cpus=settings.num_cpus, include_dashboard=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = runtime.progress
        items = [{"path": path, "map_path": map_path} for path, map_path in zip(paths, map_paths)]
        decoded = ray.data.from_items(items).map_batches(decode_files, batch_size=runtime.batch_size, batch_format="numpy")
        with warnings.catch_warnings():
            # Ray 2.60 takes max_restarts and max_task_retries only among the generic remote
            # arguments, which it warns are deprecated (for Ray 2.64)
            warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
            scored = decoded.map_batches(
                ModelScorer,
                fn_constructor_kwargs=scorer_args,
                batch_size=runtime.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=settings.actors),
                num_cpus=settings.cpus_per_actor,
                num_gpus=1 if runtime.device.startswith("cuda") else None,
                max_restarts=ACTOR_RESTARTS,
                max_task_retries=ACTOR_RESTARTS,
            )
        yield from scored.iter_batches(batch_size=ROW_GROUP_ROWS, batch_format="pyarrow")
    finally:
        if started_here:
            ray.shutdown()


def _import_ray() -> Any:
    """The ``ray`` package with Ray Data, or a FlawmapError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise FlawmapError(f'--engine ray needs Ray ({error}): pip install "flawmap[ray]"') from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail now, in one line, when nothing listens at a ``HOST:PORT`` address (Ray itself would
    keep retrying); other forms (``auto``, ``ray://...``) are left to Ray."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise FlawmapError(f"--address {address}: no Ray cluster answers there ({error.strerror or error})") from None


# ---------------------------------------------------------------- output
def is_results_table(path: Path) -> bool:
    """Whether ``path`` is a Parquet file of :data:`RESULT_SCHEMA` (one ``score`` wrote)."""
    try:
        return pq.read_schema(path).equals(RESULT_SCHEMA, check_metadata=False)
    except (OSError, pa.ArrowException):
        return False


def _write_rows(tables: Generator[pa.Table, None, None], out: Path, n_expected: int, *, progress: bool) -> ScoreSummary:
    """Write ``tables`` into ``out`` through :class:`ParquetRows`, counting what they hold; the
    generator is closed (a Ray instance started for it stopped) whatever happens."""
    n_images = n_anomalous = n_errors = 0
    bar = tqdm(total=n_expected, desc="scoring", disable=not progress, unit="img", file=sys.stderr, mininterval=0.5)
    with bar, closing(tables), ParquetRows(out) as rows:
        for table in tables:
            rows.write(table)
            n_images += table.num_rows
            n_anomalous += pc.sum(table["is_anomalous"]).as_py() or 0
            n_errors += table.num_rows - table["error"].null_count
            bar.update(table.num_rows)
    return ScoreSummary(out=out, n_images=n_images, n_anomalous=n_anomalous, n_errors=n_errors)


class ParquetRows:
    """A Parquet file of :data:`RESULT_SCHEMA` rows, written in row groups of up to
    ``row_group_rows`` as tables come in. It is written to a temporary file beside ``path`` and
    renamed to ``path`` (replacing any earlier file) only when the ``with`` block ends without an
    exception; otherwise the temporary file is removed and ``path`` is left as it was.
    """

    def __init__(self, path: Path, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.path = path
        self.row_group_rows = row_group_rows
        self._pending: list[pa.Table] = []
        self._n_pending = 0

    def __enter__(self) -> ParquetRows:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(handle)
        self._temporary = Path(name)
        set_umask_mode(self._temporary, folder=False)
        self._writer = pq.ParquetWriter(self._temporary, RESULT_SCHEMA)
        return self

    def write(self, table: pa.Table) -> None:
        """Add rows (columns of :data:`RESULT_SCHEMA` in any order and compatible types)."""
        self._pending.append(table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA))
        self._n_pending += table.num_rows
        if self._n_pending >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._n_pending:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=self.row_group_rows)
        self._pending, self._n_pending = [], 0

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            if error_type is None:
                self._flush()
        finally:
            self._writer.close()
            if error_type is None:
                os.replace(self._temporary, self.path)
            else:
                self._temporary.unlink(missing_ok=True)
