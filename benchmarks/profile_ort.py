"""Where ONNX Runtime float32 spends its batch-1 time, by kind of layer, next to a float32 matmul: why the
"within 1.5x of the float32 floor" target of issue 14 is out of reach for an EfficientNet on this CPU.

ORT's own profiler (``enable_profiling``) gives every kernel's time and its input/output shapes; from the weight
shape and the output shape each convolution's FLOPs follow (2 per multiply-add). Convolutions are grouped as
1x1 (pointwise), depthwise (one input channel per group) and other kxk (the stem); the share of time, the share
of FLOPs and the achieved GFLOP/s of each group are printed, and the floor each group would allow if it ran at the
matmul's rate. Model: timm ``efficientnet_lite0`` with random weights (speed does not depend on them), 1 thread.

    .venv/bin/python benchmarks/profile_ort.py [--model efficientnet_lite0] [--size 224] [--runs 60]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch


def conv_kind(weight_shape: list[int]) -> tuple[str, float]:
    """(kind, multiply-adds per output element) of a convolution from its weight shape [Cout, Cin/g, kh, kw]
    (ORT's blocked NCHWc weights keep that layout's product per output channel)."""
    per = float(np.prod(weight_shape)) / weight_shape[0]
    k = weight_shape[-2] * weight_shape[-1] if len(weight_shape) >= 4 else 1
    if k == 1:
        return "conv 1x1 (pointwise)", per
    if per == k:
        return "conv depthwise", per
    return "conv kxk (stem)", per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=60)
    args = ap.parse_args()

    import onnxruntime as ort
    import timm

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="profile-ort-"))
    model = timm.create_model(args.model, pretrained=False, num_classes=3).eval()
    x = torch.randn(1, 3, args.size, args.size)
    onnx_path = tmp / "model.onnx"
    torch.onnx.export(model, x, str(onnx_path), input_names=["input"], output_names=["logits"], dynamo=False)

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / "ort")
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    warm = 10
    for _ in range(warm):
        sess.run(None, {"input": xn})
    t = time.perf_counter()
    for _ in range(args.runs):
        sess.run(None, {"input": xn})
    wall_ms = (time.perf_counter() - t) / args.runs * 1e3
    events = json.loads(Path(sess.end_profiling()).read_text())

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    mm = 2 * 1024**3 / best / 1e9

    runs = warm + args.runs
    by: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # us, flops, nodes (summed over runs)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        info = e["args"]
        op = info.get("op_name", "?")
        ins, outs = info.get("input_type_shape", []), info.get("output_type_shape", [])
        kind, flops = op, 0.0
        if "Conv" in op and len(ins) >= 2:
            w, out = next(iter(ins[1].values())), next(iter(outs[0].values()))
            kind, per = conv_kind(w)
            flops = 2 * float(np.prod(out)) * per
        elif op in ("Gemm", "MatMul", "FusedGemm"):
            kind, flops = "gemm (classifier)", 2 * float(np.prod(next(iter(ins[1].values()))))
        else:
            kind = "other (pooling, reorders, ...)"
        by[kind][0] += e["dur"]
        by[kind][1] += flops
        by[kind][2] += 1
    total_us = sum(v[0] for v in by.values()) / runs
    total_flops = sum(v[1] for v in by.values()) / runs
    floor_ms = total_flops / mm / 1e6
    print(f"model {args.model} @ {args.size}px, ORT {ort.__version__}, 1 thread, batch 1, {args.runs} timed runs")
    print(f"wall {wall_ms:.2f} ms per image; kernel time {total_us / 1e3:.2f} ms; {total_flops / 1e9:.3f} GFLOP")
    print(f"float32 matmul 1024^3: {mm:.1f} GFLOP/s -> floor {floor_ms:.2f} ms; ORT / floor = {wall_ms / floor_ms:.2f}")
    head = ("kind", "nodes", "ms", "time %", "GFLOP", "FLOP %", "GFLOP/s", "x mm")
    print(f"{head[0]:32s} " + " ".join(f"{h:>{w}s}" for h, w in zip(head[1:], (5, 6, 7, 7, 7, 8, 5), strict=True)))
    for kind, (us, fl, n) in sorted(by.items(), key=lambda kv: -kv[1][0]):
        us, fl = us / runs, fl / runs
        rate = fl / us / 1e3 if us else 0.0
        print(
            f"{kind:32s} {n // runs:5d} {us / 1e3:6.2f} {100 * us / total_us:6.1f}% {fl / 1e9:7.3f} "
            f"{100 * fl / total_flops:6.1f}% {rate:8.1f} {rate / mm:5.2f}"
        )
    pw = by.get("conv 1x1 (pointwise)", [0.0, 0.0, 0])
    pw_ms, rest_ms = pw[0] / runs / 1e3, (total_us - pw[0] / runs) / 1e3
    rest_flops = 100 * (1 - pw[1] / runs / total_flops)
    print(
        f"if everything but the pointwise convolutions took no time at all: {pw_ms:.2f} ms = {pw_ms / floor_ms:.2f}x "
        f"the floor; the other layers take {rest_ms:.2f} ms ({100 * rest_ms * 1e3 / total_us:.0f}% of the time for "
        f"{rest_flops:.0f}% of the FLOPs)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
