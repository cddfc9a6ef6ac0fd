"""ONNX Runtime vs PyTorch eager inference on real chest X-rays, batch 1 and 32 (target: ORT >= 2.5x).

A realistic model (timm ``efficientnet_lite0`` at 224 px, 3 classes; random weights: speed does not depend on
them) is saved as a bundle and exported with ``cxrlab.inference.export``; real cxr-tiny images go through the bundle's
own preprocessing once, and only the network is timed (preprocessing is identical for both backends).

Fair comparison: PyTorch gets its best eager setup here (``torch.inference_mode``, ``channels_last``, as many
intra-op threads as cores) and also plain ``no_grad`` NCHW is reported; ORT gets graph optimisation level ALL and
intra-op threads = cores. Variants are timed interleaved, round after round, and the median is reported, so
load from other processes hits all of them alike.

    .venv/bin/python benchmarks/bench_inference.py [--model efficientnet_lite0] [--size 224] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CXRLAB_SHARED_DATA", REPO.parent / "shared" / "data")) / "cxr-tiny"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    ap.add_argument("--b1-iters", type=int, default=8, help="batch-1 forward passes per round")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"skip: real data not found at {DATA}")
        return 0

    import timm

    from cxrlab.data.io import read_xray
    from cxrlab.inference.bundle import BundleMeta, load_bundle, save_bundle
    from cxrlab.inference.export import export, onnx_session
    from cxrlab.transforms import norm_constants

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    torch.manual_seed(0)
    mean, std = norm_constants(3)
    meta = BundleMeta(args.model, ["COVID19", "NORMAL", "PNEUMONIA"], (args.size, args.size), 3, mean, std)
    save_bundle(timm.create_model(args.model, pretrained=False, num_classes=3), meta, tmp)
    bundle = load_bundle(tmp)
    t0 = time.perf_counter()
    onnx_path = export(bundle, "onnx")
    t_export = time.perf_counter() - t0

    paths = [p for c in meta.class_names for p in sorted((DATA / c).glob("*.jpg"))[:11]][:32]
    x = torch.stack([bundle.preprocess(read_xray(p)) for p in paths])  # 32 real images, bundle preprocessing
    xn = np.ascontiguousarray(x.numpy())

    model = bundle.model.eval()
    model_cl = load_bundle(tmp).model.eval().to(memory_format=torch.channels_last)
    sess = onnx_session(onnx_path, intra_op_threads=args.threads)

    def torch_plain(batch: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(batch).numpy()

    def torch_best(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model_cl(batch.contiguous(memory_format=torch.channels_last)).numpy()

    def ort(batch: np.ndarray) -> np.ndarray:
        return sess.run(["logits"], {"input": batch})[0]

    # agreement on the real batch
    diff = float(np.abs(ort(xn) - torch_plain(x)).max())
    diff_cl = float(np.abs(torch_best(x) - torch_plain(x)).max())

    variants = {
        "torch no_grad NCHW": (torch_plain, x),
        "torch inference_mode channels_last": (torch_best, x),
        "onnxruntime (opt ALL)": (ort, xn),
    }
    for fn, inp in variants.values():  # warm-up (first calls allocate and pick kernels)
        fn(inp[:1])
        fn(inp)

    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name, (fn, inp) in variants.items():
            t = time.perf_counter()
            for i in range(args.b1_iters):
                fn(inp[i % len(inp) : i % len(inp) + 1])
            times.setdefault((name, 1), []).append((time.perf_counter() - t) / args.b1_iters)
            t = time.perf_counter()
            fn(inp)
            times.setdefault((name, 32), []).append(time.perf_counter() - t)

    # end to end, as `cxrlab predict` runs it: decode + bundle preprocessing + network, batches of 32
    from cxrlab.inference.predict import Predictor

    e2e = {}
    for backend in ("torch", "onnx"):
        pred = Predictor(tmp, backend=backend, device="cpu", batch_size=32, progress=False)
        pred.predict(paths[:4])
        t = time.perf_counter()
        pred.predict(paths)
        e2e[backend] = len(paths) / (time.perf_counter() - t)

    import onnxruntime
    import timm as _timm

    print(
        f"model {args.model} @ {args.size}px, {len(paths)} real cxr-tiny images, {args.threads} threads, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, timm {_timm.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"ONNX export {t_export:.1f} s; max |logit diff| ORT vs torch {diff:.1e}, channels_last vs NCHW {diff_cl:.1e}"
    )
    print(f"{'variant':38s} {'batch 1 ms/img':>15s} {'batch 32 ms/img':>16s} {'img/s @32':>10s}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in variants:
        b1, b32 = med[(name, 1)] * 1e3, med[(name, 32)] * 1e3 / 32
        print(f"{name:38s} {b1:15.1f} {b32:16.2f} {1e3 / b32:10.1f}")
    ort_name = "onnxruntime (opt ALL)"
    for bs in (1, 32):
        r_best = med[("torch inference_mode channels_last", bs)] / med[(ort_name, bs)]
        r_plain = med[("torch no_grad NCHW", bs)] / med[(ort_name, bs)]
        verdict = "meets" if r_best >= 2.5 else "below"
        print(
            f"batch {bs:2d}: ORT speed-up {r_best:.2f}x vs best torch eager, {r_plain:.2f}x vs plain no_grad "
            f"({verdict} the 2.5x target vs best eager)"
        )
    print(
        f"end to end (Predictor.predict, {len(paths)} files, decode + preprocessing included): torch "
        f"{e2e['torch']:.1f} img/s, onnx {e2e['onnx']:.1f} img/s ({e2e['onnx'] / e2e['torch']:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
