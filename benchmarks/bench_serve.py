"""``flawmap serve`` under load: throughput and latency percentiles at 1, 4 and 16 concurrent clients.

Starts a real server (``flawmap serve``, uvicorn, in a child process on a loopback port) for a
PatchCore model of the category (fitted with the defaults on ``train/good``, or ``--model``), then
for each client count sends ``--requests`` of the category's test images (raw PNG bodies, each
client one keep-alive connection, one request at a time) after a warm-up round. Reports requests
per second, latency p50/p99 as the client sees it, the mean images per model pass (from
``/metrics``) and the server's resident memory. Measure on a quiet machine.

    python benchmarks/bench_serve.py                                   # ../shared/data/mvtec_ad/bottle
    python benchmarks/bench_serve.py DATA/bottle --model bottle.onnx --backend onnx
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from common import default_category, write_rows
from flawmap.cli import format_table
from flawmap.data import open_dataset
from flawmap.serve import metric_values, serve_in_subprocess

CLIENTS = (1, 4, 16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category", nargs="?", type=Path, default=default_category(), help="MVTec-layout category")
    parser.add_argument("--model", type=Path, default=Path("bench_serve_model"), help="model directory or .onnx file; fitted here if absent")
    parser.add_argument("--backend", choices=("torch", "onnx"), default=None, help="default: by --model")
    parser.add_argument("--requests", type=int, default=96, help="requests per client count (default 96)")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default 16)")
    parser.add_argument("--json", type=Path, default=Path("bench_serve.json"), help="default ./bench_serve.json")
    args = parser.parse_args()
    if not args.model.exists():
        fit_model(args.category, args.model)
    bodies = [path.read_bytes() for path in sorted(sample.image_path for sample in open_dataset(args.category).test)]
    flags = ["--max-batch", str(args.max_batch), *(["--backend", args.backend] if args.backend else [])]
    rows = []
    with serve_in_subprocess(args.model, *flags, timeout_s=600) as (url, _):
        for clients in CLIENTS:
            rows.append(measure(url, bodies, clients, args.requests))
            print(format_table(rows[-1:], list(rows[-1])), flush=True)
    print(format_table(rows, list(rows[0])))
    write_rows(args.json, args.category, rows)
    return 0


def fit_model(category: Path, out: Path) -> None:
    from flawmap.models import create_model

    print(f"fitting patchcore (defaults) on {category} into {out}", flush=True)
    create_model("patchcore").set_runtime(progress=True).fit(category).save(out)


def measure(url: str, bodies: list[bytes], clients: int, n_requests: int) -> dict:
    """Send ``n_requests`` from ``clients`` concurrent clients; one table row."""

    def run_client(index: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=url, timeout=300) as client:
            for number in range(index, n_requests, clients):
                start = time.perf_counter()
                response = client.post("/v1/predict", content=bodies[number % len(bodies)], headers={"Content-Type": "image/png"})
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)
        return latencies

    with ThreadPoolExecutor(clients) as pool:  # warm-up: one round per client
        list(pool.map(lambda index: httpx.post(f"{url}/v1/predict", content=bodies[index % len(bodies)], timeout=300), range(clients)))
    before = metric_values(httpx.get(f"{url}/metrics").text)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = np.array([latency for share in pool.map(run_client, range(clients)) for latency in share])
    seconds = time.perf_counter() - start
    after = metric_values(httpx.get(f"{url}/metrics").text)
    passes, images = (after[name] - before[name] for name in ("flawmap_batch_size_count", "flawmap_batch_size_sum"))
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / seconds, 2),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
        "images_per_pass": round(images / passes, 2),
        "server_rss_mb": round(after.get("process_resident_memory_bytes", float("nan")) / 2**20),
    }


if __name__ == "__main__":
    raise SystemExit(main())
