"""flawmap serve: the HTTP API in process (TestClient), and a real uvicorn process under load."""

import base64
import io
import os
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import flawmap
from conftest import blocked_packages_path
from flawmap.errors import FlawmapError
from flawmap.prediction import Predictor
from flawmap.regions import find_regions
from flawmap.serve import (
    ServedModel, ServeSettings, create_app, load_served_model, metric_values, serve_in_subprocess,
)

#: Good requests and bad ones in the load test, and its concurrent clients.
N_GOOD, N_BAD, N_CLIENTS = 600, 50, 12
#: The load test's upload limit (--max-upload-mb): above the test images, below OVERSIZED.
UPLOAD_LIMIT_MB = 0.25
OVERSIZED = b"\x89PNG" + bytes(400_000)


@pytest.fixture(scope="module")
def test_images(tiny_dataset) -> list[Path]:
    return sorted((tiny_dataset / "test").glob("*/*.png"))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, test_images) -> dict[Path, flawmap.Prediction]:
    """What model.predict says about each test image (float32, as the servers below run)."""
    model = flawmap.load(tiny_model_dir, precision="float32")
    return dict(zip(test_images, model.predict(test_images)))


@pytest.fixture(scope="module")
def served(tiny_model_dir) -> ServedModel:
    return load_served_model(tiny_model_dir, precision="float32", batch_size=16)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served, ServeSettings(max_upload_mb=0.1))) as client:
        yield client


def png_bytes(pixels: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


# ---------------------------------------------------------------- the API, in process
def test_predict_raw_and_multipart_equal_model_predict(client, test_images, reference):
    anomalous = next(path for path in test_images if path.parent.name != "good")
    expected = reference[anomalous]
    raw = client.post("/v1/predict", content=anomalous.read_bytes(), headers={"Content-Type": "image/png"})
    multipart = client.post("/v1/predict?map=png", files={"image": (anomalous.name, anomalous.read_bytes(), "image/png")})
    for response in (raw, multipart):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["score"] == pytest.approx(expected.score, rel=1e-4)
        assert answer["is_anomalous"] == expected.is_anomalous
        assert answer["threshold"] == pytest.approx(client.get("/v1/model").json()["threshold"])
        assert answer["model"]["method"] == "patchcore" and len(answer["model"]["hash"]) == 64
        assert answer["image_size"] == [96, 96] and answer["latency_ms"] > 0
        assert answer["pixel_threshold"] == pytest.approx(client.get("/v1/model").json()["pixel_threshold"])
        regions = [region.to_json() for region in find_regions(expected.anomaly_map, answer["pixel_threshold"])]
        approximate = [
            {**region, "peak_score": pytest.approx(region["peak_score"], rel=1e-4),
             "mean_score": pytest.approx(region["mean_score"], rel=1e-4)}
            for region in regions
        ]
        assert approximate == answer["regions"]
        assert regions  # the defect is found, so the comparison above compares something
    assert "map" not in raw.json()
    encoded = multipart.json()["map"]
    with Image.open(io.BytesIO(base64.b64decode(encoded["png_base64"]))) as picture:
        levels = np.asarray(picture, dtype=np.float64)
    assert levels.shape == expected.anomaly_map.shape
    decoded = encoded["low"] + levels / 65535.0 * (encoded["high"] - encoded["low"])
    np.testing.assert_allclose(decoded, expected.anomaly_map, atol=1e-3 * (encoded["high"] - encoded["low"]) + 1e-4)


def bad_requests() -> dict[str, tuple[int, dict]]:
    """Name -> (expected status, httpx request arguments)."""
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    truncated = png_bytes(noise)[:2000]  # cut inside the pixel data
    gif = png_bytes(np.zeros((16, 16, 3), dtype=np.uint8), "GIF")
    return {
        "empty": (400, {"content": b""}),
        "not an image": (400, {"content": b"hello, this is text", "headers": {"Content-Type": "application/octet-stream"}}),
        "truncated": (400, {"content": truncated, "headers": {"Content-Type": "image/png"}}),
        "text type": (415, {"content": b"hello", "headers": {"Content-Type": "text/plain"}}),
        "gif": (415, {"content": gif, "headers": {"Content-Type": "image/gif"}}),
        "gif as bytes": (415, {"content": gif}),
        "oversized": (413, {"content": OVERSIZED, "headers": {"Content-Type": "image/png"}}),
        "form without file": (400, {"files": {"name": (None, "just a field")}}),
        "huge dimensions": (413, {"content": png_header_claiming(8000, 6000)}),
        "decompression bomb": (400, {"content": png_header_claiming(30000, 30000)}),
        "1 x 1 image": (422, {"content": png_bytes(np.zeros((1, 1, 3), dtype=np.uint8))}),
        "bad query": (422, {"content": png_bytes(np.zeros((16, 16, 3), dtype=np.uint8)), "params": {"map": "jpeg"}}),
    }


def error_message(response, status: int) -> str:
    """The message of an error answer, checked to have the one error shape."""
    body = response.json()
    assert response.status_code == status and list(body) == ["error"] and set(body["error"]) == {"code", "message"}, body
    return body["error"]["message"]


@pytest.mark.parametrize("method, path, status, code", [
    ("get", "/nowhere", 404, "not_found"), ("get", "/v1/predict", 405, "method_not_allowed"), ("get", "/docs", 404, "not_found"),
])
def test_every_client_error_has_one_shape(client, method, path, status, code):
    response = getattr(client, method)(path)
    assert error_message(response, status) and response.json()["error"]["code"] == code


def png_header_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header says it is ``width x height`` (its pixel data is for 8 x 8)."""
    data = bytearray(png_bytes(np.zeros((8, 8, 3), dtype=np.uint8)))
    data[16:24] = struct.pack(">II", width, height)  # the IHDR chunk's data starts at byte 16
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("name", list(bad_requests()))
def test_bad_input_is_a_clear_client_error(client, name):
    status, arguments = bad_requests()[name]
    response = client.post("/v1/predict", **arguments)
    assert response.status_code == status, response.text
    message = error_message(response, status)
    assert message and "\n" not in message and "Traceback" not in message
    if name == "truncated":
        assert "truncated" in message
    assert client.get("/v1/health").status_code == 200


def test_health_ready_model_and_metrics(client, served, tiny_model_dir):
    assert client.get("/v1/health").json() == {"status": "ok"}
    assert client.get("/v1/ready").json() == {"ready": True}
    card = client.get("/v1/model").json()
    assert card["method"] == "patchcore" and card["params"]["image_size"] == 64 and card["image_size"] == 64
    assert card["threshold"] == served.model.threshold_ and card["backend"] == "torch"
    assert card["model_hash"] == flawmap.io.model_directory_digest(tiny_model_dir)
    assert card["settings"]["max_batch"] == 16 and card["flawmap_version"] == flawmap.__version__
    client.post("/v1/predict", content=b"")
    text = client.get("/metrics").text
    assert 'flawmap_requests_total{route="/v1/predict",status="400"}' in text
    assert 'flawmap_requests_total{route="/v1/ready",status="200"}' in text
    assert "flawmap_predict_latency_seconds_bucket{le=\"+Inf\"}" in text and "flawmap_queue_depth 0" in text
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert "cdn" not in client.get("/openapi.json").text.lower()  # no page of the app loads a CDN: /docs is off


def test_not_ready_before_the_model_is_warmed_up(served, test_images):
    client = TestClient(create_app(served))  # not entered: the application has not started
    assert client.get("/v1/health").status_code == 200
    assert client.get("/v1/ready").status_code == 503
    response = client.post("/v1/predict", content=test_images[0].read_bytes())
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"


class WhiteFailingModel(Predictor):
    """A model that fails every pass holding an all-white image."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.method, self.image_size, self.runtime = inner.method, inner.image_size, inner.runtime
        self.threshold_, self.map_low_, self.map_high_ = inner.threshold_, inner.map_low_, inner.map_high_

    def score_images(self, images):
        if (images.reshape(len(images), -1).min(axis=1) == 1.0).any():
            raise RuntimeError("cannot score a white image")
        return self.inner.score_images(images)


def test_a_model_failure_fails_only_its_own_request(served, test_images, reference):
    failing = ServedModel(WhiteFailingModel(served.model), "torch", served.card)
    white = png_bytes(np.full((32, 32, 3), 255, dtype=np.uint8))
    bodies = [test_images[0].read_bytes(), white, test_images[1].read_bytes(), test_images[2].read_bytes()]
    with TestClient(create_app(failing, ServeSettings(max_wait_ms=300))) as client:
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda body: client.post("/v1/predict", content=body), bodies))
        batches = metric_values(client.get("/metrics").text)
    assert [response.status_code for response in responses] == [200, 500, 200, 200]
    assert error_message(responses[1], 500) == "the model failed on this image: cannot score a white image"
    for response, path in zip([responses[0], *responses[2:]], test_images[:3]):
        assert response.json()["score"] == pytest.approx(reference[path].score, rel=1e-4)
    assert batches["flawmap_batch_size_sum"] > len(bodies) + 1  # the warm-up, a failed batch, then one by one


class GatedModel(Predictor):
    """A model whose passes wait until ``gate`` is open."""

    def __init__(self, inner: Predictor, gate: threading.Event) -> None:
        self.inner, self.gate = inner, gate
        self.method, self.image_size, self.runtime = inner.method, inner.image_size, inner.runtime
        self.threshold_, self.map_low_, self.map_high_ = inner.threshold_, inner.map_low_, inner.map_high_

    def score_images(self, images):
        assert self.gate.wait(timeout=60)
        return self.inner.score_images(images)


def test_a_full_queue_answers_503_at_once_and_recovers(served, test_images):
    gate = threading.Event()
    gate.set()
    gated = ServedModel(GatedModel(served.model, gate), "torch", served.card)
    image = test_images[0].read_bytes()
    with TestClient(create_app(gated, ServeSettings(max_batch=1, max_queue=2))) as client:
        gate.clear()
        with ThreadPoolExecutor(2) as pool:
            admitted = [pool.submit(client.post, "/v1/predict", content=image) for _ in range(2)]
            deadline = time.monotonic() + 30
            while "flawmap_queue_depth 2" not in client.get("/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            start = time.monotonic()
            refused = client.post("/v1/predict", content=image)
            assert time.monotonic() - start < 5
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1" and "busy" in error_message(refused, 503)
            gate.set()
            assert [future.result().status_code for future in admitted] == [200, 200]
        assert client.post("/v1/predict", content=image).status_code == 200


def test_runtime_must_fit_the_model_path(tiny_model_dir, tiny_onnx, tmp_path):
    with pytest.raises(FlawmapError, match="no model.onnx to run with onnxruntime; write it with: flawmap export"):
        load_served_model(tiny_model_dir, "onnx")
    with pytest.raises(FlawmapError, match="an exported .onnx file runs with onnxruntime only"):
        load_served_model(tiny_onnx, "torch")
    with pytest.raises(FlawmapError, match="no such model directory"):
        load_served_model(tmp_path / "absent")


# ---------------------------------------------------------------- a real server process
def test_load_real_server(tiny_model_dir, test_images, reference):
    """600 good requests from 12 clients with 50 bad ones among them: no 5xx but deliberate 503s,
    every answer equal to model.predict, bounded memory."""
    bad = list(bad_requests().values())
    jobs = [("good", test_images[index % len(test_images)]) for index in range(N_GOOD)]
    for index in range(N_BAD):
        jobs.insert(index * (N_GOOD // N_BAD), ("bad", bad[index % len(bad)]))
    contents = {path: path.read_bytes() for path in test_images}

    def send(client: httpx.Client, job) -> tuple:
        kind, item = job
        if kind == "bad":
            return job, client.post("/v1/predict", **item[1])
        for _ in range(100):
            response = client.post("/v1/predict", content=contents[item], headers={"Content-Type": "image/png"})
            if response.status_code != 503:
                return job, response
            time.sleep(float(response.headers["Retry-After"]) / 10)
        return job, response

    def run_client(share: list) -> list:
        with httpx.Client(base_url=url, timeout=60) as client:
            return [send(client, job) for job in share]

    flags = ("--precision", "float32", "--max-upload-mb", str(UPLOAD_LIMIT_MB), "--max-batch", "16")
    with serve_in_subprocess(tiny_model_dir, *flags) as (url, _):
        before = metric_values(httpx.get(f"{url}/metrics").text)
        with ThreadPoolExecutor(N_CLIENTS) as pool:
            results = [result for share in pool.map(run_client, [jobs[i::N_CLIENTS] for i in range(N_CLIENTS)]) for result in share]
        after = metric_values(httpx.get(f"{url}/metrics").text)
    assert len(results) == N_GOOD + N_BAD
    for (kind, item), response in results:
        if kind == "bad":
            assert response.status_code == item[0], response.text
            continue
        assert response.status_code == 200, response.text
        answer, expected = response.json(), reference[item]
        assert answer["score"] == pytest.approx(expected.score, rel=1e-4)
        assert answer["is_anomalous"] == expected.is_anomalous
    growth_mb = (after["process_resident_memory_bytes"] - before["process_resident_memory_bytes"]) / 2**20
    assert growth_mb < 100, f"resident memory grew by {growth_mb:.0f} MB"
    assert after['flawmap_requests_total{route="/v1/predict",status="200"}'] == N_GOOD
    assert after["flawmap_batch_size_sum"] - before["flawmap_batch_size_sum"] == N_GOOD
    assert after["flawmap_batch_size_count"] - before["flawmap_batch_size_count"] < N_GOOD  # concurrent requests were batched


def test_onnx_server_without_torch(tiny_onnx, test_images, tmp_path):
    """``--backend onnx`` where torch cannot be imported; answers equal the exported model's predict."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked_packages_path(tmp_path)), os.environ.get("PYTHONPATH", "")])}
    expected = flawmap.load(tiny_onnx).predict(test_images[:4])
    with serve_in_subprocess(tiny_onnx, "--backend", "onnx", env=env) as (url, _):
        card = httpx.get(f"{url}/v1/model").json()
        answers = [httpx.post(f"{url}/v1/predict", content=path.read_bytes()).json() for path in test_images[:4]]
    assert card["backend"] == "onnx" and card["model_hash"] == flawmap.load(tiny_onnx).metadata["source_sha256"]
    for answer, prediction in zip(answers, expected, strict=True):
        assert answer["score"] == pytest.approx(prediction.score, rel=1e-5)



@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_port_out_of_range_before_any_banner(capsys, tiny_model_dir, port):
    from flawmap.cli import main

    assert main(["serve", str(tiny_model_dir), "--port", port]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"flawmap: error: --port {port}: must be in 0..65535\n"


def test_serve_on_a_port_in_use_says_so_before_any_banner(capsys, tiny_model_dir):
    import socket

    from flawmap.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tiny_model_dir), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith(f"flawmap: error: cannot listen on 127.0.0.1:{port} (Address already in use)")


def test_serve_prints_no_banner_before_a_missing_extra_fails(capsys, tiny_model_dir, monkeypatch):
    """The app is built (FastAPI imported) before the banner: a missing serve extra is the only output."""
    from flawmap.cli import main

    def no_fastapi(*args, **kwargs):
        raise FlawmapError('flawmap serve needs the serve extra (No module named fastapi): pip install "flawmap[serve]"')

    monkeypatch.setattr("flawmap.serve.create_app", no_fastapi)
    assert main(["serve", str(tiny_model_dir), "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "needs the serve extra" in captured.err
