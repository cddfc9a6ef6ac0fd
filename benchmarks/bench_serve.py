"""The HTTP service under a bounded loopback load: 200 requests of real X-rays, 8 in flight at a time.

``cxrlab serve`` runs in its own process (a realistic model: timm ``efficientnet_lite0`` at 224 px, random
weights) and a client with 8 threads (httpx) posts real cxr-tiny JPEGs to ``/predict``. Reported per server
setting: errors (must be 0), p50 / p95 latency, requests/s, and the mean batch the inference thread formed.
Settings compared: ``--max-batch 1`` (one request per forward pass: a plain lock; the CPU default),
``--max-batch 8`` (greedy batching; the GPU default) and the ONNX Runtime backend, each way.

    .venv/bin/python benchmarks/bench_serve.py [--requests 200] [--concurrency 8] [--model efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CXRLAB_SHARED_DATA", REPO.parent / "shared" / "data")) / "cxr-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(bundle: Path, backend: str, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-c", "from cxrlab.cli import run; run()", "serve", str(bundle), "--port", str(port)]
    cmd += ["--backend", backend, "--max-batch", str(max_batch), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115 (lives with proc)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def _load(url: str, files: list[tuple[str, bytes]], n: int, concurrency: int) -> dict[str, float]:
    import httpx

    client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=concurrency))

    def one(i: int) -> tuple[float, int]:
        name, data = files[i % len(files)]
        t = time.perf_counter()
        try:
            r = client.post(url + "/predict", files={"file": (name, data, "image/jpeg")})
            ok = r.status_code == 200 and "label" in r.json()
        except httpx.HTTPError:
            ok = False
        return time.perf_counter() - t, 0 if ok else 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(2 * concurrency)))  # warm-up
        before = client.get(url + "/health").json()["inference"]
        t0 = time.perf_counter()
        results = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
        after = client.get(url + "/health").json()["inference"]
    client.close()
    lat = sorted(r[0] for r in results)
    passes = after["forward_passes"] - before["forward_passes"]
    return {
        "errors": sum(r[1] for r in results),
        "p50_ms": 1e3 * statistics.median(lat),
        "p95_ms": 1e3 * lat[min(len(lat) - 1, int(round(0.95 * len(lat))) - 1)],
        "rps": n / wall,
        "mean_batch": (after["requests"] - before["requests"]) / max(passes, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"skip: real data not found at {DATA}")
        return 0

    import timm
    import torch

    from cxrlab.augment import norm_constants
    from cxrlab.bundle import BundleMeta, save_bundle

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    torch.manual_seed(0)
    mean, std = norm_constants(3)
    meta = BundleMeta(args.model, ["COVID19", "NORMAL", "PNEUMONIA"], (args.size, args.size), 3, mean, std)
    bundle = save_bundle(timm.create_model(args.model, pretrained=False, num_classes=3), meta, tmp / "bundle")
    files = [(p.name, p.read_bytes()) for c in meta.class_names for p in sorted((DATA / c).glob("*.jpg"))[:20]]

    print(
        f"{args.requests} requests, {args.concurrency} concurrent, real cxr-tiny JPEGs ({len(files)} distinct), "
        f"model {args.model} @ {args.size}px, server and client on {os.cpu_count()} cores "
        f"(load average {os.getloadavg()[0]:.1f} at start)"
    )
    print(f"{'server':28s} {'errors':>6s} {'p50 ms':>8s} {'p95 ms':>8s} {'req/s':>7s} {'mean batch':>10s}")
    failed = False
    for backend, max_batch in (("torch", 1), ("torch", 8), ("onnx", 1), ("onnx", 8)):
        proc, url = _start(bundle, backend, max_batch, tmp / f"server-{backend}-{max_batch}.log")
        try:
            r = _load(url, files, args.requests, args.concurrency)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        failed |= r["errors"] > 0
        name = f"{backend}, --max-batch {max_batch}"
        print(
            f"{name:28s} {r['errors']:6d} {r['p50_ms']:8.0f} {r['p95_ms']:8.0f} {r['rps']:7.1f} {r['mean_batch']:10.2f}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
