"""The HTTP service under a bounded loopback load: 200 requests of real X-rays, 8 in flight at a time.

``cxrlab serve`` runs in its own process (a realistic model: timm ``efficientnet_lite0`` at 224 px, random
weights) and a client with 8 threads (httpx) posts real cxr-tiny JPEGs to ``/predict``. Reported per server
setting: errors (must be 0), p50 / p95 latency, requests/s, and the mean batch the inference thread formed.
Settings compared: ``--max-batch 1`` (one request per forward pass: a plain lock), ``--max-batch 8`` (greedy
batching, the default), for the torch, ONNX Runtime float32 and ONNX Runtime INT8 backends. The INT8 export is
made first with ``cxrlab.inference.export.export_int8``, calibrated on 300 cxr-tiny images (random weights: its accuracy
check is not applicable, see bench_inference.py --run). The load average is printed: at 2 or more on this 2-core
machine the run is labelled as measured under load.

    .venv/bin/python benchmarks/bench_serve.py [--requests 200] [--concurrency 8] [--model efficientnet_lite0]
        [--configs torch:1,onnx:1,onnx-int8:1]   (batch 1 only: a shorter run)
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


def _round(url: str, files: list[tuple[str, bytes]], n: int, concurrency: int) -> tuple[list[float], int, float]:
    """``n`` requests, ``concurrency`` in flight -> (latencies s, errors, wall s)."""
    import httpx

    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:

        def one(i: int) -> tuple[float, int]:
            name, data = files[i % len(files)]
            t = time.perf_counter()
            try:
                r = client.post(url + "/predict", files={"file": (name, data, "image/jpeg")})
                ok = r.status_code == 200 and r.json().get("label") is not None
            except (httpx.HTTPError, ValueError):
                ok = False
            return time.perf_counter() - t, 0 if ok else 1

        with ThreadPoolExecutor(concurrency) as pool:
            t0 = time.perf_counter()
            results = list(pool.map(one, range(n)))
            wall = time.perf_counter() - t0
    return [r[0] for r in results], sum(r[1] for r in results), wall


def _inference(url: str) -> dict:
    import httpx

    return httpx.get(url + "/health", timeout=30).json()["inference"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="per server setting")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4, help="the requests are sent in this many interleaved rounds")
    ap.add_argument(
        "--configs", default="torch:1,torch:8,onnx:1,onnx:8,onnx-int8:1,onnx-int8:8", help="backend:max_batch,..."
    )
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"skip: real data not found at {DATA}")
        return 0

    from bench_inference import SPEED_ONLY, random_bundle
    from cxrlab.inference.quantize import export_int8

    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    bundle, split = random_bundle(args.model, args.size, tmp)
    classes = ["COVID19", "NORMAL", "PNEUMONIA"]
    files = [(p.name, p.read_bytes()) for c in classes for p in sorted((DATA / c).glob("*.jpg"))[:20]]
    configs = [(b, int(m)) for b, m in (c.split(":") for c in args.configs.split(","))]
    if any(b == "onnx-int8" for b, _ in configs):
        export_int8(bundle, data=split, **SPEED_ONLY)

    # All servers start first and idle while another is measured; the requests of each are sent in interleaved
    # rounds, so load from other processes on this shared machine falls on every setting alike.
    servers = {}
    try:
        for backend, mb in configs:
            servers[(backend, mb)] = _start(bundle, backend, mb, tmp / f"server-{backend}-{mb}.log")
        lat: dict = {c: [] for c in configs}
        errors = dict.fromkeys(configs, 0)
        wall = dict.fromkeys(configs, 0.0)
        before = {}
        for c in configs:
            _round(servers[c][1], files, 2 * args.concurrency, args.concurrency)  # warm-up
            before[c] = _inference(servers[c][1])
        per_round = max(1, args.requests // args.rounds)
        t_start = time.perf_counter()
        for _ in range(args.rounds):
            for c in configs:
                ls, err, w = _round(servers[c][1], files, per_round, args.concurrency)
                lat[c] += ls
                errors[c] += err
                wall[c] += w
        load = os.getloadavg()[0]
        print(
            f"{per_round * args.rounds} requests per setting ({args.rounds} interleaved rounds of {per_round}), "
            f"{args.concurrency} concurrent, real cxr-tiny JPEGs ({len(files)} distinct, up to 512 px), "
            f"model {args.model} @ {args.size}px; server and client share {os.cpu_count()} cores "
            f"(load average {load_start:.1f} before, {load:.1f} after; {time.perf_counter() - t_start:.0f} s)"
            + ("" if max(load, load_start) < 2 else ": MEASURED UNDER LOAD")
        )
        print(f"{'server':28s} {'errors':>6s} {'p50 ms':>8s} {'p95 ms':>8s} {'req/s':>7s} {'mean batch':>10s}")
        for c in configs:
            after = _inference(servers[c][1])
            passes = max(after["forward_passes"] - before[c]["forward_passes"], 1)
            ls = sorted(lat[c])
            p95 = ls[min(len(ls) - 1, int(round(0.95 * len(ls))) - 1)]
            name = f"{c[0]}, --max-batch {c[1]}"
            print(
                f"{name:28s} {errors[c]:6d} {1e3 * statistics.median(ls):8.0f} {1e3 * p95:8.0f} "
                f"{len(ls) / wall[c]:7.1f} {(after['requests'] - before[c]['requests']) / passes:10.2f}"
            )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=30)
    return 1 if any(errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
