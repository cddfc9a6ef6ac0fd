"""Explain stage: Grad-CAM speed, lung-segmentation agreement, and the effect of text removal.

Three parts (``--part cam,lungs,removal``; default ``cam,lungs``):

- ``cam``: ``cxrlab.analysis.explain.explain`` on 150 real cxr-tiny images (50 per class) with ``efficientnet_lite0`` at
  224 px (random weights: speed does not depend on them), end to end (decode, Grad-CAM, lung segmentation, text
  detection, thumbnails, HTML) and per component. Target: < 2 minutes on 2 cores.
- ``lungs``: mean IoU of ``cxrlab.analysis.lungs.segment_lungs`` against the expert lung masks that the PyPI package
  ``torchxrayvision`` ships for ieee8023 images (``semantic_masks_v7labs_lungs.zip``), matched to cxr-full's
  COVID19 images by the original file name in ``SOURCES.csv``. Nothing is downloaded here: pass the zip with
  ``--lung-masks`` (or ``CXRLAB_LUNG_MASKS``), or have torchxrayvision installed. To get the zip::

      pip download --no-deps torchxrayvision==1.5.7 -d /tmp/txv
      unzip -o /tmp/txv/torchxrayvision-1.5.7-py3-none-any.whl \\
          torchxrayvision/data/semantic_masks_v7labs_lungs.zip -d /tmp/txv

- ``removal``: two short runs on cxr-tiny (the cpu profile's pretrained efficientnet_lite0 at 160 px, 2 epochs),
  without and with ``preprocess.text_removal=inpaint``; test accuracy / macro-F1 and the explanation's attention
  on text, in the lungs and on the border, per class. Costs several minutes.

    .venv/bin/python benchmarks/bench_explain.py [--part cam,lungs,removal] [--lung-masks ZIP] [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXRLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
TINY, FULL = SHARED / "cxr-tiny", SHARED / "cxr-full"
MASKS_IN_ZIP = "semantic_masks_v7labs_lungs/"


def _sample_csv(root: Path, per_class: int, out: Path) -> Path:
    """A path,label csv of the first ``per_class`` images of each class folder (sorted names)."""
    rows = []
    for c in ("COVID19", "NORMAL", "PNEUMONIA"):
        rows += [(str(p), c) for p in sorted((root / c).glob("*.jpg"))[:per_class]]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return out


# --------------------------------------------------------------------------------------------- cam


def bench_cam(work: Path, n_per_class: int, size: int, threads: int) -> dict:
    import timm
    import torch

    from cxrlab.analysis.cam import CamEngine, image_regions
    from cxrlab.analysis.explain import ExplainConfig, explain
    from cxrlab.data.io import read_xray
    from cxrlab.inference.bundle import BundleMeta, load_bundle, save_bundle
    from cxrlab.transforms import norm_constants

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mean, std = norm_constants(3)
    meta = BundleMeta("efficientnet_lite0", ["COVID19", "NORMAL", "PNEUMONIA"], (size, size), 3, mean, std)
    bdir = save_bundle(timm.create_model("efficientnet_lite0", pretrained=False, num_classes=3), meta, work / "bundle")
    data = _sample_csv(TINY, n_per_class, work / "cam-data.csv")

    t0 = time.perf_counter()
    res = explain(ExplainConfig(target=bdir, data=data, out=work / "explain-cam", progress=False, wandb="off"))
    total = time.perf_counter() - t0

    # components, on the same images
    paths = [r["path"] for r in csv.DictReader(data.open())]
    b = load_bundle(bdir)
    t = time.perf_counter()
    grays = [read_xray(p) for p in paths]
    t_read = time.perf_counter() - t
    x = torch.stack([b.preprocess(g) for g in grays])
    t = time.perf_counter()
    with CamEngine(b.model, None, "gradcam", (1, 3, size, size)) as eng:
        for i in range(0, len(x), 16):
            eng(x[i : i + 16])
    t_cam = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), 16):
            b.model(x[i : i + 16])
    t_fwd = time.perf_counter() - t
    t = time.perf_counter()
    for g in grays:
        image_regions(g, (size, size))
    t_reg = time.perf_counter() - t
    out = {
        "images": res.n_images,
        "size": size,
        "threads": threads,
        "explain_total_s": round(total, 1),
        "per_image_ms": round(1000 * total / max(res.n_images, 1), 1),
        "decode_s": round(t_read, 1),
        "gradcam_s": round(t_cam, 1),
        "forward_only_s": round(t_fwd, 1),
        "regions_s": round(t_reg, 1),
        "target_layer": res.target_layer,
    }
    print(
        f"cam: {res.n_images} images at {size} px, {threads} threads: explain() {total:.1f} s "
        f"({out['per_image_ms']} ms/image; target < 120 s) | Grad-CAM {t_cam:.1f} s (forward alone {t_fwd:.1f} s), "
        f"lung+text regions {t_reg:.1f} s, decode {t_read:.1f} s | layer {res.target_layer}"
    )
    return out


# --------------------------------------------------------------------------------------------- lungs


def _find_masks(arg: str | None) -> Path | None:
    cands = [arg, os.environ.get("CXRLAB_LUNG_MASKS")]
    spec = importlib.util.find_spec("torchxrayvision")  # located, not imported
    if spec is not None and spec.origin:
        cands.append(str(Path(spec.origin).parent / "data" / "semantic_masks_v7labs_lungs.zip"))
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    return None


def bench_lungs(masks_zip: Path | None, limit: int | None) -> dict:
    import cv2

    from cxrlab.analysis.lungs import iou, prior_mask, segment_lungs
    from cxrlab.data.io import read_xray

    if masks_zip is None:
        print("lungs: skip - no semantic_masks_v7labs_lungs.zip (see --help for how to get it)")
        return {}
    if not (FULL / "SOURCES.csv").is_file():
        print(f"lungs: skip - {FULL / 'SOURCES.csv'} not found")
        return {}
    z = zipfile.ZipFile(masks_zip)
    names = {Path(n).name: n for n in z.namelist() if n.startswith(MASKS_IN_ZIP) and not n.endswith("/")}
    rows = [
        r
        for r in csv.DictReader((FULL / "SOURCES.csv").open())
        if r["class"] == "COVID19" and Path(r["source_path"]).name in names
    ][:limit]
    ious, prior, methods, skipped = [], [], {}, 0
    t0 = time.perf_counter()
    for r in rows:
        m = cv2.imdecode(np.frombuffer(z.read(names[Path(r["source_path"]).name]), np.uint8), cv2.IMREAD_GRAYSCALE)
        if m is None or (m.shape[1], m.shape[0]) != (int(r["orig_width"]), int(r["orig_height"])):
            skipped += 1  # a mask of a differently cropped version of the figure
            continue
        img = read_xray(FULL / r["file"])
        gt = cv2.resize(m, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST) > 127
        seg = segment_lungs(img)
        ious.append(iou(seg.mask, gt))
        prior.append(iou(prior_mask(*img.shape), gt))
        methods[seg.method] = methods.get(seg.method, 0) + 1
    dt = time.perf_counter() - t0
    out = {
        "images": len(ious),
        "skipped_size_mismatch": skipped,
        "mean_iou": round(float(np.mean(ious)), 3),
        "median_iou": round(float(np.median(ious)), 3),
        "share_iou_below_0.5": round(float(np.mean(np.array(ious) < 0.5)), 3),
        "prior_only_mean_iou": round(float(np.mean(prior)), 3),
        "methods": methods,
        "ms_per_image": round(1000 * dt / max(len(ious), 1), 1),
    }
    print(
        f"lungs: {len(ious)} ieee8023 images with v7labs masks: mean IoU {out['mean_iou']} (median "
        f"{out['median_iou']}, {out['share_iou_below_0.5']:.0%} below 0.5); prior ellipses alone "
        f"{out['prior_only_mean_iou']}; methods {methods}; {out['ms_per_image']} ms/image"
    )
    return out


# --------------------------------------------------------------------------------------------- removal


def bench_removal(work: Path, epochs: int, size: int) -> dict:
    from cxrlab.analysis.explain import ExplainConfig, explain
    from cxrlab.config import load_config
    from cxrlab.data.ingest import IngestConfig, ingest
    from cxrlab.data.split import SplitConfig, split
    from cxrlab.training.train import train

    split_dir = work / "tiny-split"
    if not (split_dir / "split.csv").is_file():
        ingest(IngestConfig(src=TINY, out=work / "tiny-manifest", progress=False))
        split(SplitConfig(manifest=work / "tiny-manifest", out=split_dir, progress=False))
    out: dict = {}
    for mode in ("none", "inpaint"):
        overrides = [
            f"data={split_dir}",
            f"epochs={epochs}",
            f"img_size=[{size},{size}]",
            f"preprocess.text_removal={mode}",
            f"output_dir={work / 'runs'}",
            f"run_name=removal-{mode}",
            "tracking.wandb=off",
            "trainer.enable_progress_bar=false",
        ]
        cfg = load_config(REPO / "configs" / "cpu.yaml", overrides)
        t0 = time.perf_counter()
        run = train(cfg)
        t_train = time.perf_counter() - t0
        res = explain(ExplainConfig(target=run.run_dir, split="test", progress=False, wandb="off"))
        out[mode] = {
            "run_dir": str(run.run_dir),
            "train_s": round(t_train, 1),
            "test_accuracy": round(run.metrics.get("test/accuracy", float("nan")), 4),
            "test_f1_macro": round(run.metrics.get("test/f1_macro", float("nan")), 4),
            "attention": {k: round(v, 4) for k, v in res.summary.items() if isinstance(v, float)},
            "attention_per_class": {
                c: {k: round(v, 4) for k, v in s.items() if isinstance(v, float)} for c, s in res.per_class.items()
            },
        }
        s = res.summary
        print(
            f"removal={mode}: test acc {out[mode]['test_accuracy']}, macro-F1 {out[mode]['test_f1_macro']} "
            f"({t_train:.0f} s train); attention in lungs {s['in_lungs']:.3f}, on text {s['on_text']:.3f} "
            f"(images with text: {s['on_text_where_text']:.3f}, text area {s['text_area']:.3f}), border "
            f"{s['on_border']:.3f}",
            flush=True,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="cam,lungs", help="comma-separated: cam, lungs, removal")
    ap.add_argument("--lung-masks", default=None, help="path of semantic_masks_v7labs_lungs.zip")
    ap.add_argument("--lung-limit", type=int, default=None, help="use only the first N masked images")
    ap.add_argument("--per-class", type=int, default=50, help="cam: images per class (150 in all)")
    ap.add_argument("--size", type=int, default=224, help="cam: input size")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--removal-epochs", type=int, default=2)
    ap.add_argument("--removal-size", type=int, default=160)
    ap.add_argument("--work", default=None, help="working folder (default: a new temp folder)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    if not TINY.is_dir():
        print(f"skip: real data not found at {TINY}")
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-explain-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = {p.strip() for p in args.part.split(",") if p.strip()}
    figures: dict = {"work": str(work)}
    if "cam" in parts:
        figures["cam"] = bench_cam(work, args.per_class, args.size, args.threads)
    if "lungs" in parts:
        figures["lungs"] = bench_lungs(_find_masks(args.lung_masks), args.lung_limit)
    if "removal" in parts:
        figures["removal"] = bench_removal(work, args.removal_epochs, args.removal_size)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ok = "cam" not in figures or figures["cam"]["explain_total_s"] < 120
    print("all targets met" if ok else "target missed: Grad-CAM on the images took >= 120 s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
