"""``flawmap serve``: an HTTP inference server for a fitted or exported model.

A FastAPI application run by uvicorn. Requests that arrive together are *micro-batched*: the
first image waits at most ``max_wait_ms`` for up to ``max_batch - 1`` more, and the batch goes
through the model in one pass, on one worker thread, off the event loop. At most ``max_queue``
requests are admitted at once (reading, decoding, waiting or being scored); one more is answered
``503`` with ``Retry-After`` at once, so the server never hangs and its memory stays bounded.

=======================  ======================================================================
``POST /v1/predict``     one image (raw body or multipart; PNG, JPEG, BMP, TIFF) -> score,
                         verdict, threshold, pixel threshold, model, latency, defect regions
                         (boxes of the connected map regions above the pixel threshold, with
                         area, peak and mean score: :mod:`flawmap.regions`);
                         ``?map=png`` adds the anomaly map (16-bit grey PNG, base64, at the
                         image's size, with the score range its levels span)
``GET /v1/health``       liveness: 200 while the process serves
``GET /v1/ready``        200 once the model is loaded and warmed up, 503 before and when stopping
``GET /v1/model``        the model card (:mod:`flawmap.model_card`: what ``flawmap info --json``
                         says), the backend and device running it, versions, server settings
``GET /metrics``         Prometheus text: requests by route and status, predict latency and batch
                         size histograms, queue depth
``GET /openapi.json``    the OpenAPI description (no ``/docs`` page: FastAPI's loads its
                         scripts from a CDN, blank on an offline factory network)
=======================  ======================================================================

Bad input never disturbs other requests: a body over ``max_upload_mb`` is ``413``, an empty body
or bytes that are not a decodable image ``400`` (naming the problem), another content type or image
format ``415``, an image the model cannot take (smaller than its patch grid) or a bad query
parameter ``422``, an unknown route ``404``. Every error answer has one shape:
``{"error": {"code": "unsupported_media_type", "message": "..."}}``. With an exported ``.onnx`` model this module does not import torch.

No ``from __future__ import annotations`` here: FastAPI reads the route handlers' annotations,
which name classes imported inside :func:`create_app`.
"""

import asyncio
import base64
import io
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import numpy as np
from PIL import Image

from flawmap._version import __version__
from flawmap.data.images import decode_image
from flawmap.errors import FlawmapError
from flawmap.loading import load
from flawmap.model_card import ModelCard, model_card
from flawmap.onnx_model import OnnxModel
from flawmap.prediction import Prediction, Predictor

#: Pillow format -> content type of the image formats accepted.
IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "BMP": "image/bmp", "TIFF": "image/tiff"}
#: Content types a raw body or a multipart file part may declare besides the image types (the
#: bytes tell the format): none, bytes, variants, and ``curl --data-binary``'s default.
GENERIC_CONTENT_TYPES = ("", "application/octet-stream", "image/x-ms-bmp", "image/jpg", "application/x-www-form-urlencoded")
#: Upper bounds (seconds) of the predict latency histogram's buckets.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Upper bounds of the batch size histogram's buckets.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: Largest image accepted, in pixels (decoded, it takes 3 bytes a pixel and more while resized).
MAX_IMAGE_PIXELS = 40_000_000
#: Seconds a client is asked to wait after a 503.
RETRY_AFTER_S = 1
ROUTES = ("/v1/predict", "/v1/health", "/v1/ready", "/v1/model", "/metrics")


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches and what it admits.

    Parameters
    ----------
    max_batch : int
        Most images scored in one model pass.
    max_queue : int
        Most requests admitted at once; more are answered 503.
    max_upload_mb : float
        Largest request body, in MiB; larger is 413.
    max_wait_ms : float
        How long the first image of a batch waits for more.
    """

    max_batch: int = 16
    max_queue: int = 64
    max_upload_mb: float = 20.0
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1:
            raise FlawmapError(f"max_batch and max_queue must be at least 1, got {self.max_batch} and {self.max_queue}")
        if not (self.max_upload_mb > 0 and self.max_wait_ms >= 0):  # NaN fails too
            raise FlawmapError(f"max_upload_mb must be > 0 and max_wait_ms >= 0, got {self.max_upload_mb} and {self.max_wait_ms}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


@dataclass(frozen=True)
class ServedModel:
    """A loaded model, the backend that runs it and its card (what ``/v1/model`` says about it)."""

    model: Predictor
    backend: str
    card: ModelCard

    def describe(self) -> dict[str, Any]:
        """The model card (:mod:`flawmap.model_card`, the same as ``flawmap info --json``), the
        backend and device that run it here, and this server's flawmap version."""
        return {**self.card.to_json(), "backend": self.backend, "device": self.model.runtime.device, "flawmap_version": __version__}


def load_served_model(path: str | Path, backend: str = "auto", **runtime_settings: Any) -> ServedModel:
    """Load a model to serve with :func:`flawmap.load` (``backend``: ``"auto"``, ``"torch"`` or
    ``"onnx"``; an ``.onnx`` file, or a model directory's own export, runs without torch).

    Raises
    ------
    FlawmapError
        If the model does not load with the backend asked for.
    """
    model = load(path, backend, **runtime_settings)
    exported = isinstance(model, OnnxModel)
    return ServedModel(model=model, backend="onnx" if exported else "torch", card=model_card(model, None if exported else path))


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with a one-line ``message``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class _Waiting:
    """One decoded image (uint8 H x W x 3) waiting for its batch, and where its result goes."""

    image: np.ndarray
    result: asyncio.Future


class MicroBatcher:
    """Admits at most ``max_queue`` requests and scores their images in batches of up to
    ``max_batch``, one model pass at a time on one worker thread."""

    def __init__(self, model: Predictor, settings: ServeSettings, observe_batch) -> None:
        self.model = model
        self.settings = settings
        self.depth = 0
        self._observe_batch = observe_batch
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flawmap-model")
        self._task: asyncio.Task | None = None

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the ``max_queue`` places for a request; 503 at once if none is free."""
        if self.depth >= self.settings.max_queue:
            raise RequestError(
                503, f"busy: {self.depth} requests in progress (--max-queue {self.settings.max_queue}); retry shortly",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    async def predict(self, image: np.ndarray) -> Prediction:
        """The prediction for one image (uint8 H x W x 3), scored with whatever arrives with it."""
        waiting = _Waiting(image, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(waiting)
        return await waiting.result

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve_batches())

    async def run_in_worker(self, function, *args):
        """Run ``function(*args)`` on the model's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._worker.shutdown(wait=True)

    async def _serve_batches(self) -> None:
        while True:
            await self._score(await self._next_batch())

    async def _score(self, batch: list[_Waiting]) -> None:
        """One model pass for ``batch``; if it fails, each image alone, so only a culprit fails."""
        self._observe_batch(len(batch))
        try:
            predictions = await self.run_in_worker(self.model.predict, [waiting.image for waiting in batch])
        except Exception as error:  # the model's own failure: its request gets a 500, the server goes on
            if len(batch) > 1:
                for waiting in batch:
                    await self._score([waiting])
            elif not batch[0].result.done():
                batch[0].result.set_exception(error)
            return
        for waiting, prediction in zip(batch, predictions):
            if not waiting.result.done():  # its client may have gone
                waiting.result.set_result(prediction)

    async def _next_batch(self) -> list[_Waiting]:
        """The first waiting image, and whatever else arrives within ``max_wait_ms``, up to ``max_batch``."""
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.settings.max_wait_ms / 1000.0
        while len(batch) < self.settings.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch


@dataclass
class Histogram:
    """A cumulative Prometheus histogram over fixed bucket bounds."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        buckets = [f'{name}_bucket{{le="{bound:g}"}} {count}' for bound, count in zip(self.bounds, self.counts)]
        return [*buckets, f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


@dataclass
class ServerMetrics:
    """Counters the ``/metrics`` endpoint reports."""

    requests: Counter = field(default_factory=Counter)
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))

    def prometheus_text(self, queue_depth: int) -> str:
        lines = [
            "# HELP flawmap_requests_total HTTP requests by route and status code.",
            "# TYPE flawmap_requests_total counter",
            *(f'flawmap_requests_total{{route="{route}",status="{status}"}} {count}' for (route, status), count in sorted(self.requests.items())),
            "# HELP flawmap_predict_latency_seconds Time from receiving a predict request to its answer.",
            "# TYPE flawmap_predict_latency_seconds histogram",
            *self.latency.lines("flawmap_predict_latency_seconds"),
            "# HELP flawmap_batch_size Images per model pass.",
            "# TYPE flawmap_batch_size histogram",
            *self.batch_size.lines("flawmap_batch_size"),
            "# HELP flawmap_queue_depth Predict requests admitted and not yet answered.",
            "# TYPE flawmap_queue_depth gauge",
            f"flawmap_queue_depth {queue_depth}",
        ]
        resident = resident_memory_bytes()
        if resident is not None:
            lines += [
                "# HELP process_resident_memory_bytes Resident memory of the server process.",
                "# TYPE process_resident_memory_bytes gauge",
                f"process_resident_memory_bytes {resident}",
            ]
        return "\n".join(lines) + "\n"


def resident_memory_bytes() -> int | None:
    """This process's resident memory (Linux ``/proc``), or None where that cannot be read."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), None)


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text (as ``/metrics`` writes it) to ``{"name{labels}": value}``."""
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def map_png(anomaly_map: np.ndarray) -> dict[str, Any]:
    """The map (H x W) as a 16-bit grey PNG, base64: level ``v`` is score ``low + v / 65535 * (high - low)``."""
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    levels = np.rint((anomaly_map - low) / max(high - low, 1e-12) * 65535.0).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    return {"png_base64": base64.b64encode(buffer.getvalue()).decode("ascii"), "low": low, "high": high}


def create_app(served: ServedModel, settings: ServeSettings = ServeSettings()):
    """The FastAPI application serving ``served`` (run it with any ASGI server)."""
    try:
        from fastapi import FastAPI, Query, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, PlainTextResponse
        from starlette.exceptions import HTTPException
    except ImportError as error:
        raise FlawmapError(f'flawmap serve needs the serve extra ({error}): pip install "flawmap[serve]"') from None

    metrics = ServerMetrics()
    batcher = MicroBatcher(served.model, settings, metrics.batch_size.observe)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        size = served.model.image_size
        await batcher.run_in_worker(served.model.predict, np.zeros((size, size, 3), dtype=np.uint8))  # warm-up
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.stop()

    app = FastAPI(  # no /docs or /redoc: their pages load scripts from a CDN, blank offline
        title="flawmap", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
        description=f"Anomaly detection with a {served.model.method} model ({served.card.path}).",
    )

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.url.path if request.url.path in ROUTES else "other"
        metrics.requests[(route, response.status_code)] += 1
        return response

    @app.exception_handler(RequestError)
    async def refuse(request: Request, error: RequestError):
        return _error_response(JSONResponse, error)

    @app.exception_handler(HTTPException)
    async def refuse_route(request: Request, error: HTTPException):  # unknown route, wrong method
        return _error_response(JSONResponse, RequestError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", error.headers))

    @app.exception_handler(RequestValidationError)
    async def refuse_parameters(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}" for problem in error.errors())
        return _error_response(JSONResponse, RequestError(422, f"invalid request ({problems})"))

    @app.post("/v1/predict", openapi_extra=_PREDICT_BODY_DOC, summary="Score one image")
    async def predict(request: Request, map: str | None = Query(None, pattern="^png$", description="png: add the anomaly map")):
        start = time.perf_counter()
        _check_length(request, settings.max_upload_bytes)
        if not state["ready"]:
            raise RequestError(503, "the model is not ready", {"Retry-After": str(RETRY_AFTER_S)})
        async with batcher.slot():
            data, content_type = await _read_image_bytes(request, settings.max_upload_bytes)
            image = await asyncio.to_thread(_decode_upload, data, content_type)
            try:
                served.model.check_image(image, "upload")
            except FlawmapError as error:  # before batching: it would fail its batch, then alone
                raise RequestError(422, str(error)) from None
            try:
                prediction = await batcher.predict(image)
            except FlawmapError as error:  # an image the model cannot take, e.g. smaller than its patch grid
                raise RequestError(422, str(error)) from None
            except Exception as error:
                raise RequestError(500, f"the model failed on this image: {error}") from None
            answer = await asyncio.to_thread(_answer, served, prediction, map == "png")
        latency = time.perf_counter() - start
        metrics.latency.observe(latency)
        return {**answer, "latency_ms": 1000.0 * latency}

    @app.get("/v1/health", summary="Liveness")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/ready", summary="Readiness: the model is loaded and warmed up")
    async def ready():
        if not state["ready"]:
            return JSONResponse({"ready": False}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"ready": True}

    @app.get("/v1/model", summary="The model served")
    async def served_model():
        return {**served.describe(), "settings": vars(settings)}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus():
        return PlainTextResponse(metrics.prometheus_text(batcher.depth), media_type="text/plain; version=0.0.4")

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening); FlawmapError for a port outside
    0..65535, an unknown host or an address in use, so that nothing is announced before it is bound."""
    if not 0 <= port <= 65535:
        raise FlawmapError(f"--port {port}: must be in 0..65535")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as error:
        raise FlawmapError(f"--host {host}: cannot resolve it ({error})") from None
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses a port in TIME_WAIT
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise FlawmapError(f"cannot listen on {host}:{port} ({error.strerror or error}); is another server using it?") from None
    return sock


def serve(app, settings: ServeSettings, sock: socket.socket, log_level: str = "info") -> None:
    """Run ``app`` (:func:`create_app`) on the bound ``sock`` (:func:`bind_socket`) until
    interrupted (uvicorn; SIGINT/SIGTERM stop it after the requests in progress)."""
    import uvicorn

    # A backstop on open connections (uvicorn answers 503 past it), well above what --max-queue admits.
    connections = 2 * settings.max_queue + settings.max_batch + 16
    config = uvicorn.Config(app, log_level=log_level, limit_concurrency=connections, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])


@contextmanager
def serve_in_subprocess(
    model: str | Path, *flags: str, env: dict[str, str] | None = None, timeout_s: float = 120.0
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``flawmap serve MODEL *flags`` in a child process on a free loopback port, wait until
    ``/v1/ready``, and yield its base URL and process; the process is stopped on exit.

    For tests and benchmarks against a real server. Raises FlawmapError (with the server's
    output) if it exits or is not ready within ``timeout_s``.
    """
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "flawmap.cli", "serve", str(model), "--port", str(port), "--log-level", "warning", *flags]
    with tempfile.TemporaryFile("w+") as output:  # a file, not a pipe: a full pipe would stall the server
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while not _is_ready(httpx, url):
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    output.seek(0)
                    raise FlawmapError(f"flawmap serve {model} did not get ready: {output.read().strip()[-2000:]}")
                time.sleep(0.2)
            yield url, process
        finally:
            process.terminate()
            process.wait(timeout=30)


def _is_ready(httpx, url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# ---------------------------------------------------------------- reading and answering one request
_PREDICT_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            **{content_type: {"schema": {"type": "string", "format": "binary"}} for content_type in IMAGE_FORMATS.values()},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}}, "required": ["image"]}
            },
        },
    }
}


def _error_response(json_response, error: RequestError):
    """Every error answer: ``{"error": {"code": "payload_too_large", "message": "..."}}``, the
    code being the status's standard phrase in snake case."""
    code = HTTPStatus(error.status).phrase.lower().replace(" ", "_").replace("-", "_")
    return json_response({"error": {"code": code, "message": error.message}}, status_code=error.status, headers=error.headers)


def _check_length(request, max_bytes: int) -> None:
    """413 at once when the declared body length is over the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"request body of {int(declared)} bytes is over the limit of {max_bytes} bytes (--max-upload-mb)")


async def _read_image_bytes(request, max_bytes: int) -> tuple[bytes, str]:
    """The uploaded file's bytes and declared content type, from a raw body or a multipart form."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"request body is over the limit of {max_bytes} bytes (--max-upload-mb)")
        chunks.append(chunk)
    body = b"".join(chunks)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _multipart_file(request, body)
    return body, content_type


async def _multipart_file(request, body: bytes) -> tuple[bytes, str]:
    """The one file part of a multipart body (already read, ``body``)."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except HTTPException as error:
        raise RequestError(400, f"malformed multipart body: {error.detail}") from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise RequestError(400, "the multipart body has no file part; send the image as a file field (e.g. image=@photo.png)")
        return await files[0].read(), (files[0].content_type or "").lower()
    finally:
        await form.close()


def _decode_upload(data: bytes, content_type: str) -> np.ndarray:
    """Check the content type and the format, then decode: uint8 H x W x 3. 400 or 415 otherwise."""
    if not data:
        raise RequestError(400, "empty body: send the image file's bytes (raw or as a multipart file field)")
    if content_type not in GENERIC_CONTENT_TYPES and content_type not in IMAGE_FORMATS.values():
        raise RequestError(415, f"unsupported content type {content_type!r}; send {', '.join(IMAGE_FORMATS.values())}")
    try:
        with Image.open(io.BytesIO(data)) as header:
            image_format, (width, height) = header.format, header.size
    except Exception:  # Pillow's errors for bytes it cannot read; decoding below names them
        image_format = None
    if image_format is not None and image_format not in IMAGE_FORMATS:
        raise RequestError(415, f"unsupported image format {image_format}; send {', '.join(IMAGE_FORMATS)}")
    if image_format is not None and width * height > MAX_IMAGE_PIXELS:
        raise RequestError(413, f"a {width} x {height} image is over the limit of {MAX_IMAGE_PIXELS / 1e6:g} megapixels")
    try:
        return decode_image(data, "upload")
    except FlawmapError as error:
        raise RequestError(400, str(error)) from None


def _answer(served: ServedModel, prediction: Prediction, with_map: bool) -> dict[str, Any]:
    """The JSON answer for one prediction (without the latency)."""
    model = served.model
    height, width = prediction.anomaly_map.shape
    answer = {
        "score": prediction.score,
        "is_anomalous": bool(prediction.is_anomalous),
        "threshold": model.threshold_,
        "pixel_threshold": model.map_high_,
        "model": {"method": model.method, "hash": served.card.model_hash},
        "image_size": [width, height],
        "regions": [region.to_json() for region in prediction.regions],
    }
    if with_map:
        answer["map"] = map_png(prediction.anomaly_map)
    return answer
