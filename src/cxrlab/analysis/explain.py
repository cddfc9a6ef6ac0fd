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
(``"logit"``, classic Grad-CAM); see :class:`PredictedMargin` for why. Only the part of the network after the
target layer is differentiated (weights are frozen and the target activation is made a leaf), so a CAM costs
little more than a forward pass.

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

import html
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
import torch
from pydantic import Field

from cxrlab.atomic import json_safe, write_json
from cxrlab.config import StrictModel
from cxrlab.errors import CxrlabError
from cxrlab.inference.infer import resolve_device
from cxrlab.runs import ATTENTION_CSV, ATTENTION_FILE, EXPLAIN_HTML, THUMBS_DIR, find_run_dir, read_summary, stage_dir
from cxrlab.tracking import resumed_run, tracked_run_info

log = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcam++")
CAM_TARGETS = ("margin", "logit")
REGIONS = ("in_lungs", "on_text", "on_border")
HTML_FILE = EXPLAIN_HTML


class ExplainError(CxrlabError):
    """Explanation cannot proceed; the message says which input is wrong and what to do."""


class ExplainConfig(StrictModel):
    """What to explain, on which images, how, and where the results go."""

    target: Path = Field(description="run directory or bundle directory")
    split: Literal["test", "val", "train"] = Field("test", description="split of the run's data (or of data's)")
    data: Path | None = Field(None, description="other data: folder of class folders, manifest or split csv")
    only_errors: bool = Field(False, description="explain only the misclassified images")
    method: Literal["gradcam", "gradcam++"] = "gradcam"
    cam_target: Literal["margin", "logit"] = Field(
        "margin", description="differentiate the predicted class's logit margin over the others, or its raw logit"
    )
    target_layer: str | None = Field(None, description="module name of the CAM layer; default: last conv stage")
    out: Path | None = Field(None, description="output directory; default <run>/explain-<split>")
    batch_size: int = Field(16, ge=1)
    max_images: int | None = Field(None, ge=1, description="explain at most this many (a seeded sample)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    border: float = Field(0.08, gt=0, lt=0.5, description="width of the border frame, as a share of each side")
    text_dilate: float = Field(0.015, ge=0, lt=0.2, description="dilation of the text mask, as a share of the side")
    thumb_size: int = Field(192, ge=32, le=1024, description="longer side of the HTML thumbnails in pixels")
    wandb: Literal["auto", "off"] = Field("auto", description="auto = add a table to the run's W&B run if tracked")
    seed: int = Field(0, description="seed of the max_images sample")
    progress: bool = True


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


# --------------------------------------------------------------------------------------------- Grad-CAM


def conv_layer_candidates(
    model: torch.nn.Module, input_shape: tuple[int, int, int, int]
) -> list[tuple[str, tuple[int, int]]]:
    """Modules with a 4-D output, in the order their forward finished: [(name, (height, width))]."""
    names = {m: n for n, m in model.named_modules() if n}
    order: list[tuple[str, tuple[int, int]]] = []
    hooks = []

    def hook(mod: torch.nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.ndim == 4 and mod in names:
            order.append((names[mod], (int(out.shape[-2]), int(out.shape[-1]))))

    for m in names:
        hooks.append(m.register_forward_hook(hook))
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(input_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return order


def resolve_target_layer(
    model: torch.nn.Module, name: str | None, input_shape: tuple[int, int, int, int]
) -> tuple[str, torch.nn.Module, tuple[int, int]]:
    """The Grad-CAM layer: ``name`` when given, else the last module (in execution order) with a 4-D output
    larger than 1x1 - the last convolutional stage before global pooling (``bn2`` of timm's EfficientNets,
    ``layer4`` of ResNets, ``stages.3`` of ConvNeXt). Also returns the layer's output (height, width)."""
    modules = dict(model.named_modules())
    order = conv_layer_candidates(model, input_shape)
    if name:
        if name not in modules:
            cands = [n for n, _ in order][-8:]
            raise ExplainError(
                f"target layer {name!r} is not a module of this model; last convolutional modules: "
                f"{', '.join(cands) or 'none'}"
            )
        sizes = dict(order)
        if name not in sizes:
            raise ExplainError(f"target layer {name!r} has no 4-D (N, C, H, W) output; pick a convolutional module")
        return name, modules[name], sizes[name]
    spatial = [(n, hw) for n, hw in order if hw[0] * hw[1] > 1]
    chosen = spatial[-1] if spatial else (order[-1] if order else None)
    if chosen is None:
        raise ExplainError(
            f"{type(model).__name__} has no module with a 4-D (N, C, H, W) output: Grad-CAM here needs a CNN; "
            "pass --target-layer for other architectures"
        )
    return chosen[0], modules[chosen[0]], chosen[1]


@contextmanager
def _cam_graph_from(model: torch.nn.Module, layer: torch.nn.Module) -> Iterator[None]:
    """Differentiate only from the target layer on: freeze the weights and make the layer output a leaf that
    requires grad (pytorch-grad-cam's own hook, registered later, then stores its gradient)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)

    def make_leaf(_m: torch.nn.Module, _i: Any, out: Any) -> Any:
        if isinstance(out, torch.Tensor) and not out.requires_grad:
            return out.detach().requires_grad_(True)
        return out

    h = layer.register_forward_hook(make_leaf)
    try:
        yield
    finally:
        h.remove()
        for p, rg in saved:
            p.requires_grad_(rg)


class PredictedMargin:
    """pytorch-grad-cam target: the predicted class's logit minus the mean of the other logits.

    Why not the raw logit: a model can predict a class by pushing the *other* logits down (measured on the
    planted-shortcut phantoms: a model that followed the marker 100% of the time, yet whose raw-logit Grad-CAM
    hardly touched it). The margin sees evidence for the class and against the others alike; unlike the softmax
    probability it does not saturate for confident predictions."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        c = int(output.argmax(-1))
        k = output.shape[-1]
        return output[..., c] - (output.sum(-1) - output[..., c]) / max(k - 1, 1)


class CamEngine:
    """Batched Grad-CAM / Grad-CAM++ for the predicted class. ``__call__(x) -> (cams N x H x W, probs N x K)``.

    ``target``: "margin" (default, see :class:`PredictedMargin`) or "logit" (the classic Grad-CAM target)."""

    def __init__(
        self,
        model: torch.nn.Module,
        layer_name: str | None,
        method: str,
        input_shape: tuple[int, ...],
        target: str = "margin",
    ):
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus

        if method not in METHODS:
            raise ExplainError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        if target not in CAM_TARGETS:
            raise ExplainError(f"unknown CAM target {target!r}; valid: {', '.join(CAM_TARGETS)}")
        self.target = target
        self.model = model.eval()
        shape = tuple(input_shape)
        self.layer_name, self.layer, self.feature_hw = resolve_target_layer(model, layer_name, shape)  # type: ignore[arg-type]
        # one CAM cell in input pixels: the finest detail the CAM can place
        self.cell = max(shape[-2] / self.feature_hw[0], shape[-1] / self.feature_hw[1])
        self._ctx = _cam_graph_from(model, self.layer)
        self._ctx.__enter__()  # the leaf hook must run before pytorch-grad-cam's activation hook
        cls = GradCAM if method == "gradcam" else GradCAMPlusPlus
        self.cam = cls(model=model, target_layers=[self.layer])
        self.method = method

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = x.to(next(self.model.parameters()).device)
        with torch.enable_grad():
            targets = [PredictedMargin()] * len(x) if self.target == "margin" else None  # None: argmax logit
            cams = self.cam(input_tensor=x, targets=targets)
        probs = torch.softmax(self.cam.outputs.detach().float(), dim=1).cpu().numpy()
        return np.asarray(cams, dtype=np.float32), probs

    def close(self) -> None:
        self.cam.activations_and_grads.release()
        self._ctx.__exit__(None, None, None)

    def __enter__(self) -> CamEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- regions


def border_mask(height: int, width: int, frac: float) -> np.ndarray:
    """The outer frame of ``frac`` of each side (at least one pixel)."""
    m = np.zeros((height, width), bool)
    bh, bw = max(1, int(round(frac * height))), max(1, int(round(frac * width)))
    m[:bh, :] = m[-bh:, :] = True
    m[:, :bw] = m[:, -bw:] = True
    return m


def _to_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask to (height, width); a pixel is set when any part of it was (area coverage > 0)."""
    h, w = size
    if mask.shape == (h, w):
        return mask.astype(bool)
    return cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 1e-3


@dataclass
class Regions:
    lungs: np.ndarray
    text: np.ndarray
    border: np.ndarray
    lung_method: str
    text_score: float
    text_boxes: int


def image_regions(
    gray: np.ndarray, size: tuple[int, int], border: float = 0.08, text_dilate: float = 0.015, min_dilate: float = 0
) -> Regions:
    """Lung, text and border masks of an original image, in model-input space (``size`` = (height, width)).

    The text region is the union of the detected glyph boxes, dilated by ``text_dilate`` of the longer side but
    at least ``min_dilate`` pixels (``explain`` passes half a CAM cell: a CAM cannot place attention more finely,
    so a CAM looking at a marker spreads over that margin around it)."""
    from cxrlab.analysis.lungs import segment_lungs
    from cxrlab.data.textdetect import detect_text

    h, w = size
    lm = segment_lungs(gray)
    det = detect_text(gray)
    boxes = np.zeros(gray.shape[:2], np.uint8)
    for x, y, bw, bh in det.boxes:
        boxes[y : y + bh, x : x + bw] = 1
    text = _to_size(boxes.astype(bool) | np.asarray(det.mask, bool), size)
    r = int(round(max(text_dilate * max(h, w), min_dilate)))
    if r > 0 and text.any():
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        text = cv2.dilate(text.astype(np.uint8), k).astype(bool)
    lungs = cv2.resize(lm.mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return Regions(
        lungs=lungs,
        text=text,
        border=border_mask(h, w, border),
        lung_method=lm.method,
        text_score=float(det.score),
        text_boxes=len(det.boxes),
    )


def attention_share(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the CAM mass (CAM normalised to sum 1) inside ``mask``; NaN for an all-zero CAM."""
    cam = np.clip(np.asarray(cam, np.float64), 0, None)
    total = cam.sum()
    if not np.isfinite(total) or total <= 0:
        return float("nan")
    return float(cam[mask].sum() / total)


# --------------------------------------------------------------------------------------------- images


def overlay(display: np.ndarray, cam: np.ndarray, regions: Regions | None, thumb: int) -> tuple[np.ndarray, np.ndarray]:
    """(gray thumbnail, Grad-CAM overlay thumbnail) as BGR uint8; the overlay outlines the lung fields (green)
    and the detected text (magenta)."""
    h, w = display.shape
    s = thumb / max(h, w)
    tw, th = max(1, int(round(w * s))), max(1, int(round(h * s)))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    g = cv2.cvtColor(cv2.resize(display, (tw, th), interpolation=interp), cv2.COLOR_GRAY2BGR)
    c = cv2.resize(np.clip(cam, 0, 1).astype(np.float32), (tw, th), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap((c * 255).astype(np.uint8), cv2.COLORMAP_JET)
    ov = cv2.addWeighted(g, 0.55, heat, 0.45, 0)
    if regions is not None:
        for m, col in ((regions.lungs, (80, 220, 80)), (regions.text, (255, 0, 255))):
            if m.any():
                small = cv2.resize(m.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
                cnts, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(ov, cnts, -1, col, 1, cv2.LINE_AA)
    return g, ov


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
    from tqdm.auto import tqdm

    from cxrlab.data.io import ImageReadError, read_xray
    from cxrlab.data.items import resolve_items
    from cxrlab.inference.bundle import load_bundle, resolve_bundle_dir
    from cxrlab.preprocess import apply_preprocess
    from cxrlab.transforms import to_channels

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
    tf = bundle.transform()
    spec = meta.preprocess

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    n_seen = 0
    engine = CamEngine(bundle.model, cfg.target_layer, cfg.method, (1, meta.in_chans, *size), cfg.cam_target)
    bar = tqdm(total=len(paths), desc=f"explain {cfg.split} ({cfg.method})", unit="img", disable=not cfg.progress)
    try:
        for start in range(0, len(paths), cfg.batch_size):
            batch: list[tuple[int, np.ndarray, np.ndarray]] = []  # (index, original gray, preprocessed gray)
            for i in range(start, min(start + cfg.batch_size, len(paths))):
                try:
                    gray = read_xray(paths[i])
                except (ImageReadError, FileNotFoundError) as e:
                    skipped.append({"path": paths[i], "reason": str(getattr(e, "reason", None) or e)})
                    continue
                batch.append((i, gray, apply_preprocess(gray, spec)))
            if batch:
                x = torch.stack([tf(image=to_channels(p, meta.in_chans))["image"] for _, _, p in batch])
                if cfg.only_errors:  # a cheap forward first; CAMs only for the misclassified
                    with torch.no_grad():
                        pr = torch.softmax(bundle.model(x.to(device)).float(), 1).argmax(1).cpu().numpy()
                    n_seen += len(batch)
                    wrong = [j for j, (i, _, _) in enumerate(batch) if pr[j] != cidx[labels[i]]]
                    batch, x = [batch[j] for j in wrong], x[wrong]
                else:
                    n_seen += len(batch)
                if batch:
                    cams, probs = engine(x)
                    for (i, gray, pre), cam, p in zip(batch, cams, probs, strict=True):
                        rows.append(
                            _row(i, paths[i], labels[i], classes, cam, p, gray, pre, size, cfg, thumbs, engine.cell)
                        )
            bar.update(min(cfg.batch_size, len(paths) - start))
    finally:
        bar.close()
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
    _write_html(out / HTML_FILE, table, doc, classes)
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
) -> dict[str, Any]:
    from cxrlab.transforms import resize_gray

    reg = image_regions(gray, size, cfg.border, cfg.text_dilate, min_dilate=cell / 2)
    pred = int(np.argmax(probs))
    display = resize_gray(pre, size)
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


# --------------------------------------------------------------------------------------------- HTML

# the shared report style (cxrlab.report.html) plus what the image table needs; the only script is the sorting
# and filtering below (inline, no CDN)
_CSS = """
body{max-width:none}
table.rows{border-collapse:collapse;font-size:13px}
table.rows th,table.rows td{border:1px solid var(--line);padding:3px 6px;text-align:right;vertical-align:middle}
table.rows th{background:var(--soft);position:sticky;top:0;cursor:pointer;user-select:none}
table.rows td.l,table.rows th.l{text-align:left}
tr.wrong td{background:#fff1f0}tr.ok td.res{color:#17803d}tr.wrong td.res{color:#c62828;font-weight:600}
table.rows img{display:block}
.controls{margin:.6rem 0;display:flex;gap:1rem;flex-wrap:wrap;align-items:center}
.sw{display:inline-block;width:.9em;height:.9em;vertical-align:middle}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
"""

_JS = """
const tb=document.querySelector('#rows tbody'),rows=[...tb.rows],f=id=>document.getElementById(id);
function apply(){const c=f('fclass').value,p=f('fpred').value,o=f('foutcome').value,
lo=parseFloat(f('fconf').value||'0'),hi=parseFloat(f('fconfmax').value||'1');let n=0;
for(const r of rows){const d=r.dataset,cf=parseFloat(d.confidence);
const show=(!c||d.label===c)&&(!p||d.prediction===p)&&(!o||d.outcome===o)&&cf>=lo&&cf<=hi;
r.style.display=show?'':'none';n+=show}f('count').textContent=n+' of '+rows.length+' shown'}
document.querySelectorAll('.controls select,.controls input').forEach(e=>e.addEventListener('input',apply));
document.querySelectorAll('#rows th[data-key]').forEach(th=>th.addEventListener('click',()=>{
const k=th.dataset.key,num=th.dataset.num==='1',asc=!th.classList.contains('sorted-asc');
document.querySelectorAll('#rows th').forEach(t=>t.classList.remove('sorted-asc','sorted-desc'));
th.classList.add(asc?'sorted-asc':'sorted-desc');
rows.sort((a,b)=>{let x=a.dataset[k],y=b.dataset[k];if(num){x=parseFloat(x);y=parseFloat(y);
x=isNaN(x)?-1:x;y=isNaN(y)?-1:y}return (x<y?-1:x>y?1:0)*(asc?1:-1)});rows.forEach(r=>tb.appendChild(r))}));
apply();
"""


def _fmt(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _data_key(name: str) -> str:
    """A column name as an HTML data-* key (lower case letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _dataset_name(key: str) -> str:
    """The JavaScript ``dataset`` property of a data-* key (``p-covid19`` -> ``pCovid19``)."""
    parts = key.split("-")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def _summary_rows(doc: dict[str, Any]) -> list[list[Any]]:
    groups = [("all images", doc["summary"])]
    groups += [(f"true {c}", s) for c, s in doc["per_class"].items()]
    groups += [(f"{k} predictions", s) for k, s in doc["by_outcome"].items()]
    keys = ("n_images", "accuracy", "in_lungs", "lung_area", "on_text", "on_text_where_text", "text_area", "with_text")
    keys += ("on_border",)
    return [[name, *[s.get(k) for k in keys]] for name, s in groups if s and s.get("n_images")]


def _write_html(path: Path, table: pd.DataFrame, doc: dict[str, Any], classes: list[str]) -> None:
    from cxrlab.report import html as rh

    e = html.escape
    model = doc["model"]
    border = float(doc["regions"].get("border_frac", 0.08))
    meta = rh.kv(
        [
            ("model", f"{model['name']} {model.get('run_id') or ''} ({model['bundle']})"),
            ("images", doc["data"]),
            (
                "explained",
                f"{len(table)} ({'errors only; ' if doc['subset'] == 'errors' else ''}"
                f"{doc['n_seen']} read, {len(doc['skipped'])} unreadable)",
            ),
            ("Grad-CAM", f"{doc['method']} of the predicted class ({doc['cam_target']}) on {doc['target_layer']}"),
            ("preprocessing", json.dumps(model.get("preprocess"))),
        ]
    )
    cols_sum = [
        "group",
        "images",
        "accuracy",
        "in lungs",
        "lung area",
        "on text",
        "on text (images with text)",
        "text area",
        "images with text",
        f"on border (area {1 - (1 - 2 * border) ** 2:.2f})",
    ]
    summary = rh.section(
        "Mean attention share of the Grad-CAM mass",
        rh.table(_summary_rows(doc), columns=cols_sum, float_fmt="{:.3f}"),
        "<p>Attention share = part of the CAM mass (CAM normalised to sum 1 per image) inside a region: "
        "<span class=sw style='background:#50dc50'></span> lung fields (classical segmentation), "
        "<span class=sw style='background:#ff00ff'></span> detected burned-in text/markers, and the outer "
        f"{border:.0%} border. Regions may overlap. The areas are what a uniform CAM would put on each region: "
        "a model whose <em>on text</em> is well above the text area looks at the labels.</p>",
    )
    opts = "".join(f"<option>{e(c)}</option>" for c in classes)
    controls = (
        "<div class=controls>"
        f"<label>true class <select id=fclass><option value=''>all</option>{opts}</select></label>"
        f"<label>prediction <select id=fpred><option value=''>all</option>{opts}</select></label>"
        "<label>outcome <select id=foutcome><option value=''>all</option><option value=wrong>errors</option>"
        "<option value=correct>correct</option></select></label>"
        "<label>confidence from <input id=fconf type=number min=0 max=1 step=0.05 value=0 style='width:5em'></label>"
        "<label>to <input id=fconfmax type=number min=0 max=1 step=0.05 value=1 style='width:5em'></label>"
        "<span id=count></span> <span class=caption>(click a column header to sort)</span></div>"
    )
    cols: list[tuple[str, str, bool]] = [  # (column, header, numeric)
        ("index", "#", True),
        ("label", "label", False),
        ("prediction", "prediction", False),
        ("correct", "result", False),
        ("confidence", "confidence", True),
        *[(f"p_{c}", f"p({c})", True) for c in classes],
        ("in_lungs", "in lungs", True),
        ("on_text", "on text", True),
        ("on_border", "on border", True),
    ]
    th = ["<th class=l>image</th><th class=l>Grad-CAM</th>"]
    for col, hd, num in cols:
        th.append(f"<th data-key='{_dataset_name(_data_key(col))}' data-num='{int(num)}'>{e(hd)}</th>")
    th.append("<th class=l>file</th>")
    body = []
    for r in table.to_dict("records"):
        data = " ".join(f"data-{_data_key(c)}='{e(str(r[c]))}'" for c, _, _ in cols if c != "correct")
        outcome = "correct" if r["correct"] else "wrong"
        cells = [
            f"<td class=l><img src='{e(r['image'])}' alt='image' loading=lazy></td>",
            f"<td class=l><img src='{e(r['overlay'])}' alt='Grad-CAM' loading=lazy></td>",
            f"<td>{r['index']}</td><td class=l>{e(r['label'])}</td><td class=l>{e(r['prediction'])}</td>",
            f"<td class='l res'>{'correct' if r['correct'] else 'WRONG'}</td><td>{r['confidence']:.3f}</td>",
            *[f"<td>{r[f'p_{c}']:.3f}</td>" for c in classes],
            f"<td>{_fmt(r['in_lungs'])}</td><td>{_fmt(r['on_text'])}</td><td>{_fmt(r['on_border'])}</td>",
            f"<td class=l title='{e(r['path'])}'>{e(Path(r['path']).name)}</td>",
        ]
        cls = "ok" if r["correct"] else "wrong"
        body.append(f"<tr class={cls} data-outcome={outcome} {data}>{''.join(cells)}</tr>")
    images = rh.section(
        "Images",
        "<p>Overlay: Grad-CAM of the predicted class (red = high) on the input as the model sees it, with the "
        "lung fields (green) and detected text (magenta) outlined.</p>",
        controls,
        f"<table id=rows class=rows><thead><tr>{''.join(th)}</tr></thead><tbody>{''.join(body)}</tbody></table>",
    )
    page = rh.page(
        f"Explanations: {model['name']} {model.get('run_id') or ''}".strip(),
        [f"<style>{_CSS}</style>", meta, summary, images, f"<script>{_JS}</script>"],
        subtitle=f"{doc['split']} · {len(table)} images · accuracy {_fmt(doc['summary'].get('accuracy'))}",
    )
    rh.write_page(path, page)


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
