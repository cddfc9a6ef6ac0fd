"""Explanations and error analysis: Grad-CAM per image, attention measured in numbers, an HTML error table.

``explain(ExplainConfig) -> ExplainResult`` runs a bundle (or a run directory's bundle) on the run's own split
(or any folder of class folders / manifest / split csv given as ``data``) and writes to ``out``::

    explain.html     self-contained page (with thumbs/): image, Grad-CAM overlay, label, prediction, per-class
                     scores, correct/wrong, confidence, attention shares; sortable and filterable, no CDN
    thumbs/          JPEG thumbnails (the input as the model sees it, and the Grad-CAM overlay)
    attention.csv    one row per image: prediction, scores, attention in lungs / on text / on the border, ...
    attention.json   per-model means overall, per true class, for correct and wrong predictions (see below)

Grad-CAM / Grad-CAM++ come from ``pytorch-grad-cam`` and are computed for the predicted class on the last
convolutional stage of any timm CNN (chosen automatically: the last module, in execution order, with a 4-D
output of more than 1x1 pixels; override with ``target_layer``). The differentiated score is the predicted
class's logit margin over the mean of the other logits (``cam_target="margin"``, default) or its raw logit
(``"logit"``, classic Grad-CAM); see ``cxrlab.analysis.cam.PredictedMargin`` for why. Only the part of the
network after the target layer is differentiated (weights are frozen and the target activation is made a leaf),
so a CAM costs little more than a forward pass.

Attention shares: the CAM (as returned by pytorch-grad-cam: ReLU, min-max scaled, upsampled to the model input)
is normalised to sum 1 over the image; the share of that mass inside a region is the attention on the region:

- ``in_lungs``: lung fields from ``cxrlab.analysis.lungs.segment_lungs`` (classical segmentation, anatomical prior as
  fallback; see its limits there);
- ``on_text``: burned-in text and markers found by ``cxrlab.data.textdetect.detect_text`` on the original image
  (before any text removal, so the effect of removal can be measured), dilated by ``text_dilate`` of the side;
- ``on_border``: the outer frame of ``border`` (default 8%) of each side.

Regions may overlap (a corner label lies on the border too), so the three shares need not sum to <= 1. An image
without detected text has ``on_text = 0``; ``on_text_where_text`` averages over images with text only.

``attention.json`` (read by ``cxrlab compare``)::

    {"format": 1, "subset": "all" | "errors", "split": ..., "data": ..., "model": {...}, "method": "gradcam",
     "target_layer": "bn2", "regions": {...definitions...},
     "summary":   {"in_lungs": m, "on_text": m, "on_border": m, "on_text_where_text": m, "with_text": share,
                   "text_area": m, "lung_area": m,          # what a uniform CAM would score: the baselines
                   "n_images": n, "accuracy": a},          # flat numbers: the per-model headline
     "per_class": {"<true class>": {same keys}, ...},
     "by_outcome": {"correct": {...}, "wrong": {...}},
     "lung_segmentation": {"segmented": n, "partial": n, "prior": n},
     "skipped": [{"path": ..., "reason": ...}], "files": {...}}
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

from cxrlab.analysis.cam import REGIONS, CamEngine, attention_share, image_regions, overlay
from cxrlab.analysis.configs import ExplainConfig
from cxrlab.atomic import json_safe, write_json
from cxrlab.errors import ExplainError
from cxrlab.inference.infer import forward_pass, read_batches, resolve_device
from cxrlab.report.explain_page import write_explain_page
from cxrlab.runs import ATTENTION_CSV, ATTENTION_FILE, EXPLAIN_HTML, THUMBS_DIR, find_run_dir, read_summary, stage_dir
from cxrlab.tracking import resumed_run, tracked_run_info

log = logging.getLogger(__name__)

HTML_FILE = EXPLAIN_HTML


@dataclass
class ExplainResult:
    out_dir: Path
    html: Path
    attention_json: Path
    attention_csv: Path
    table: pd.DataFrame  # one row per explained image (attention.csv)
    summary: dict[str, float]  # overall means (attention.json "summary")
    per_class: dict[str, dict[str, float]]  # by true class
    classes: list[str]
    method: str
    target_layer: str
    n_images: int  # explained
    n_seen: int  # read and predicted (>= n_images when only_errors)
    skipped: list[dict[str, str]] = field(default_factory=list)
    wandb_logged: bool = False
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------- aggregation


def _means(df: pd.DataFrame) -> dict[str, float]:
    out: dict[str, float] = {"n_images": int(len(df))}
    for k in REGIONS:
        v = df[k].to_numpy(dtype=float)
        out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    with_text = df["text_detected"].to_numpy(dtype=bool)
    out["with_text"] = float(with_text.mean()) if len(df) else float("nan")
    wt = df.loc[with_text, "on_text"].to_numpy(dtype=float)
    out["on_text_where_text"] = float(np.nanmean(wt)) if np.isfinite(wt).any() else float("nan")
    # what a uniform CAM would put on each region: the baseline to read the shares against
    out["text_area"] = float(df["text_area"].mean()) if len(df) else float("nan")
    out["lung_area"] = float(df["lung_area"].mean()) if len(df) else float("nan")
    out["accuracy"] = float(df["correct"].mean()) if len(df) else float("nan")
    return out


def summarise(df: pd.DataFrame, classes: list[str]) -> tuple[dict[str, float], dict[str, dict[str, float]], dict]:
    """(overall means, means per true class, means for correct / wrong predictions)."""
    overall = _means(df)
    per_class = {c: _means(df[df["label"] == c]) for c in classes if (df["label"] == c).any()}
    by_outcome = {k: _means(df[df["correct"] == v]) for k, v in (("correct", True), ("wrong", False))}
    return overall, per_class, by_outcome


# --------------------------------------------------------------------------------------------- explain


def _default_out(cfg: ExplainConfig, bundle_dir: Path, run_dir: Path | None) -> Path:
    base = run_dir if run_dir is not None else bundle_dir
    return stage_dir(base, "explain", cfg.split, cfg.data, tail="-errors" if cfg.only_errors else "")


def _sample(n: int, k: int | None, seed: int) -> list[int]:
    if k is None or k >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def explain(cfg: ExplainConfig) -> ExplainResult:
    """Grad-CAM for every image of the split (or only the errors); attention scores; HTML table; W&B table."""
    from cxrlab.data.items import resolve_items
    from cxrlab.inference.bundle import load_bundle, resolve_bundle_dir
    from cxrlab.preprocess import apply_preprocess
    from cxrlab.transforms import split_cached

    t0 = time.perf_counter()
    bundle_dir = resolve_bundle_dir(cfg.target)
    run_dir = find_run_dir(bundle_dir)
    device = resolve_device(cfg.device, ExplainError)
    bundle = load_bundle(bundle_dir, device=device)
    meta = bundle.meta
    classes = list(meta.class_names)
    items = resolve_items(run_dir or bundle_dir, cfg.split, cfg.data, classes, meta.config or {})
    if not items.paths:
        raise ExplainError(f"no images found in {items.source}")
    keep = _sample(len(items.paths), cfg.max_images, cfg.seed)
    paths = [items.paths[i] for i in keep]
    labels = [items.labels[i] for i in keep]
    cidx = {c: i for i, c in enumerate(classes)}

    out = Path(cfg.out) if cfg.out else _default_out(cfg, bundle_dir, run_dir)
    thumbs = out / THUMBS_DIR
    thumbs.mkdir(parents=True, exist_ok=True)
    size = tuple(meta.img_size)
    spec = meta.preprocess

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    n_seen = 0
    resize = split_cached(bundle.transform())[0]  # the model input's resize, for the thumbnails

    def prepare(gray: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:  # (preprocessed gray, model input)
        pre = apply_preprocess(gray, spec)
        return pre, bundle.model_input(pre)

    engine = CamEngine(bundle.model, cfg.target_layer, cfg.method, (1, meta.in_chans, *size), cfg.cam_target)
    desc = f"explain {cfg.split} ({cfg.method})"
    try:
        for read in read_batches(paths, cfg.batch_size, skipped, cfg.progress, desc, prepare=prepare):
            # (index, original gray, preprocessed gray)
            batch = [(i, g, pre) for i, g, (pre, _) in zip(read.indices, read.grays, read.inputs, strict=True)]
            if not batch:
                continue
            x = torch.stack([t for _, t in read.inputs])
            n_seen += len(batch)
            if cfg.only_errors:  # a cheap forward first; CAMs only for the misclassified
                pr = forward_pass(bundle.model, x)[0].argmax(1)
                wrong = [j for j, (i, _, _) in enumerate(batch) if pr[j] != cidx[labels[i]]]
                batch, x = [batch[j] for j in wrong], x[wrong]
            if batch:
                cams, probs = engine(x)
                for (i, gray, pre), cam, p in zip(batch, cams, probs, strict=True):
                    rows.append(
                        _row(i, paths[i], labels[i], classes, cam, p, gray, pre, size, cfg, thumbs, engine.cell, resize)
                    )
    finally:
        engine.close()
    for s in skipped:
        log.warning("skipped %s: %s", s["path"], s["reason"])
    if n_seen == 0:
        raise ExplainError(f"none of the {len(paths)} images in {items.source} could be read (see the reasons above)")

    table = pd.DataFrame(rows, columns=_columns(classes))
    overall, per_class, by_outcome = summarise(table, classes) if len(table) else ({}, {}, {})
    summary = read_summary(run_dir)
    doc = {
        "format": 1,
        "subset": "errors" if cfg.only_errors else "all",
        "split": cfg.split if cfg.data is None else "external",
        "data": items.source,
        "dataset_version": items.dataset_version,
        "model": {
            "name": meta.model_name,
            "run_id": meta.run_id or summary.get("run_id", ""),
            "bundle": str(bundle_dir),
            "img_size": list(size),
            "preprocess": meta.preprocess,
        },
        "classes": classes,
        "method": cfg.method,
        "cam_target": cfg.cam_target,
        "target_layer": engine.layer_name,
        "regions": {
            "in_lungs": (
                "cxrlab.analysis.lungs.segment_lungs (threshold + watershed + convex hull; prior ellipses fallback)"
            ),
            "on_text": (
                "cxrlab.data.textdetect.detect_text glyph boxes on the original image, dilated by "
                f"max({cfg.text_dilate:g} of the side, half a CAM cell = {engine.cell / 2:g} px)"
            ),
            "on_border": f"outer {cfg.border:.0%} frame",
            "border_frac": cfg.border,
            "normalisation": "CAM (ReLU, min-max, upsampled) normalised to sum 1 per image; regions may overlap",
        },
        "summary": overall,
        "per_class": per_class,
        "by_outcome": by_outcome,
        "n_seen": n_seen,
        "lung_segmentation": table["lung_method"].value_counts().to_dict() if len(table) else {},
        "skipped": skipped,
        "files": {"html": HTML_FILE, "csv": ATTENTION_CSV, "thumbs": THUMBS_DIR},
    }
    write_json(out / ATTENTION_FILE, json_safe(doc))
    table.to_csv(out / ATTENTION_CSV, index=False, float_format="%.6g")
    write_explain_page(out / HTML_FILE, table, doc, classes)
    result = ExplainResult(
        out_dir=out,
        html=out / HTML_FILE,
        attention_json=out / ATTENTION_FILE,
        attention_csv=out / ATTENTION_CSV,
        table=table,
        summary=overall,
        per_class=per_class,
        classes=classes,
        method=cfg.method,
        target_layer=engine.layer_name,
        n_images=len(table),
        n_seen=n_seen,
        skipped=skipped,
    )
    if cfg.wandb != "off" and run_dir is not None and len(table):
        result.wandb_logged = log_to_wandb(result, run_dir, summary, cfg)
    result.seconds = time.perf_counter() - t0
    return result


def _columns(classes: list[str]) -> list[str]:
    return [
        "index",
        "path",
        "label",
        "prediction",
        "correct",
        "confidence",
        *[f"p_{c}" for c in classes],
        *REGIONS,
        "text_detected",
        "text_score",
        "text_area",
        "lung_area",
        "lung_method",
        "image",
        "overlay",
    ]


def _row(
    i: int,
    path: str,
    label: str,
    classes: list[str],
    cam: np.ndarray,
    probs: np.ndarray,
    gray: np.ndarray,
    pre: np.ndarray,
    size: tuple[int, int],
    cfg: ExplainConfig,
    thumbs: Path,
    cell: float,
    resize: Any,
) -> dict[str, Any]:
    reg = image_regions(gray, size, cfg.border, cfg.text_dilate, min_dilate=cell / 2)
    pred = int(np.argmax(probs))
    display = resize(image=pre)["image"]  # the model input's own resize
    g, ov = overlay(display, cam, reg, cfg.thumb_size)
    img_name, ov_name = f"{i:05d}_image.jpg", f"{i:05d}_cam.jpg"
    cv2.imwrite(str(thumbs / img_name), g, [cv2.IMWRITE_JPEG_QUALITY, 85])
    cv2.imwrite(str(thumbs / ov_name), ov, [cv2.IMWRITE_JPEG_QUALITY, 85])
    row: dict[str, Any] = {
        "index": i,
        "path": path,
        "label": label,
        "prediction": classes[pred],
        "correct": classes[pred] == label,
        "confidence": float(probs[pred]),
    }
    row.update({f"p_{c}": float(probs[j]) for j, c in enumerate(classes)})
    row["in_lungs"] = attention_share(cam, reg.lungs)
    row["on_text"] = attention_share(cam, reg.text) if reg.text.any() else 0.0
    row["on_border"] = attention_share(cam, reg.border)
    row["text_detected"] = bool(reg.text.any())
    row["text_score"] = reg.text_score
    row["text_area"] = float(reg.text.mean())
    row["lung_area"] = float(reg.lungs.mean())
    row["lung_method"] = reg.lung_method
    row["image"] = f"{THUMBS_DIR}/{img_name}"
    row["overlay"] = f"{THUMBS_DIR}/{ov_name}"
    return row


# --------------------------------------------------------------------------------------------- W&B


def log_to_wandb(result: ExplainResult, run_dir: Path, summary: dict[str, Any], cfg: ExplainConfig) -> bool:
    """Add the explanation table (overlays as images) and the attention means to the run's W&B run (same id and
    mode), when the run was tracked. Optional and robust: a failure is a warning, never an error."""
    info = tracked_run_info(run_dir, summary)
    if info is None:
        return False
    try:
        import wandb

        with resumed_run(run_dir, info, "explain") as run:
            t = result.table
            cols = ["image", "overlay", *[c for c in t.columns if c not in ("image", "overlay", "index")]]
            table = wandb.Table(columns=cols)
            for r in t.to_dict("records"):
                table.add_data(
                    wandb.Image(str(result.out_dir / r["image"])),
                    wandb.Image(str(result.out_dir / r["overlay"])),
                    *[r[c] for c in cols[2:]],
                )
            prefix = f"explain/{cfg.split if cfg.data is None else 'ext'}"
            run.log({f"{prefix}/table": table})
            run.summary.update(
                {f"{prefix}/{k}": v for k, v in result.summary.items() if isinstance(v, float) and math.isfinite(v)}
            )
        return True
    except Exception as e:  # tracking must never break an explanation
        log.warning("could not log the explanation to W&B run %s: %s", info["id"], e)
        return False
