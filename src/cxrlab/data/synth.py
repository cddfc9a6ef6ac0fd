"""Synthetic chest radiograph phantoms: the embedded default data set (demo and tests; nothing downloaded).

Each phantom has a body outline, two lung fields, ribs, spine and heart shadow, with random pose, size,
exposure and noise. Classes differ by pathology:

- NORMAL: clear lungs;
- PNEUMONIA: one focal lobar consolidation (a dense patch in one lung, lower or middle zone);
- COVID19: bilateral, peripheral, lower-zone ground-glass opacities (several faint patches in both lungs).

``shortcut_class`` plants a burned-in text marker in that class only (a known shortcut for testing the audit
and the explanation tools); ``marker_all`` puts markers on every class (so the marker carries no label).
``marker_style`` chooses the marker: ``"laterality"`` (default) is a small 'R' or 'L' at a random spot near the
top-left corner, as on real radiographs; ``"corner"`` is the word "AP" one eighth of the side tall at a fixed
spot in the top-left corner, in the background outside the body: a shortcut strong enough that every training
learns it (the explanation tests need one that does not depend on the data seed) and that the burned-in text
detector still finds, so text removal can take it away. (A bolder marker or a solid block is learned even more
easily but is not text to the detector: its strokes are wider than the detector's top-hat.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cxrlab.data.configs import PHANTOM_CLASSES, MarkerStyle, SynthConfig

CLASSES = PHANTOM_CLASSES
MARKER_STYLES: tuple[str, ...] = ("laterality", "corner")


@dataclass
class SynthResult:
    out: Path
    counts: dict[str, int] = field(default_factory=dict)
    marked: dict[str, int] = field(default_factory=dict)  # images carrying a marker, per class


def _ellipse_mask(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0


def _blob(h: int, w: int, cy: float, cx: float, sy: float, sx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2.0)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    small = rng.standard_normal((max(2, h // scale), max(2, w // scale))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _draw_marker(out: np.ndarray, rng: np.random.Generator, style: str) -> np.ndarray:
    """Burn a marker into ``out`` (in place, white); returns its ground-truth pixel mask."""
    size = out.shape[0]
    s = size / 256.0
    if style == "corner":  # the word "AP", side/8 tall, fixed in the top-left corner (no randomness)
        text, height = "AP", max(8, size // 8)
        thick = 2
        scale = cv2.getFontScaleFromHeight(cv2.FONT_HERSHEY_SIMPLEX, height, thick)
        org = (int(round(0.06 * size)), int(round(0.06 * size)) + height)
    else:  # laterality: small 'R'/'L' at a random spot near the top-left corner
        text = "R" if rng.random() < 0.5 else "L"
        scale = 1.1 * s
        thick = max(1, int(round(2 * s)))
        org = (int(rng.uniform(6, 24) * s), int(rng.uniform(28, 40) * s))
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    mk = np.zeros(out.shape, np.uint8)
    cv2.putText(mk, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 1, thick, cv2.LINE_AA)
    return mk > 0


def make_phantom(
    label: str,
    rng: np.random.Generator,
    size: int = 256,
    marker: bool = False,
    masks: dict | None = None,
    marker_style: MarkerStyle = "laterality",
) -> np.ndarray:
    """One phantom radiograph (``size`` x ``size`` uint8) of class ``label``.

    ``masks``: when a dict is given, it receives the ground truth as bool arrays: ``"lungs"`` (the two lung
    ellipses) and ``"marker"`` (pixels of the burned-in marker; all False without one). Drawing is unchanged.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown phantom class {label!r}; valid: {', '.join(CLASSES)}")
    if marker_style not in MARKER_STYLES:
        raise ValueError(f"unknown marker_style {marker_style!r}; valid: {', '.join(MARKER_STYLES)}")
    h = w = size
    s = size / 256.0
    img = np.zeros((h, w), np.float32)
    cx = w / 2 + rng.uniform(-8, 8) * s
    cy = h / 2 + rng.uniform(-6, 6) * s
    body_rx, body_ry = rng.uniform(100, 118) * s, rng.uniform(112, 126) * s
    img += 0.45 * _ellipse_mask(h, w, cy + 10 * s, cx, body_ry, body_rx)
    # lungs: dark fields left and right of the midline
    lung_ry, lung_rx = rng.uniform(66, 78) * s, rng.uniform(34, 42) * s
    off = rng.uniform(44, 52) * s
    lungs = []
    for side in (-1, 1):
        m = _ellipse_mask(h, w, cy - 2 * s, cx + side * off, lung_ry, lung_rx)
        lungs.append((side, m))
        img -= 0.28 * cv2.GaussianBlur(m.astype(np.float32), (0, 0), 3 * s)
    # ribs: bright arcs across the lung fields
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rib_period = rng.uniform(17, 21) * s
    ribs = 0.5 + 0.5 * np.cos(2 * np.pi * (yy + 0.0025 * (xx - cx) ** 2 / s) / rib_period)
    lung_any = (lungs[0][1] | lungs[1][1]).astype(np.float32)
    img += 0.07 * ribs**4 * cv2.GaussianBlur(lung_any, (0, 0), 2 * s)
    # spine and heart
    img += 0.12 * cv2.GaussianBlur(_ellipse_mask(h, w, cy, cx, 115 * s, 9 * s).astype(np.float32), (0, 0), 2 * s)
    hr = rng.uniform(30, 38) * s
    img += 0.25 * _blob(h, w, cy + 30 * s, cx + rng.uniform(8, 16) * s, hr, hr * 1.1)

    if label == "PNEUMONIA":  # one focal lobar consolidation
        side, m = lungs[rng.integers(0, 2)]
        by = cy + rng.uniform(5, 45) * s
        bx = cx + side * (off + rng.uniform(-10, 10) * s)
        blob = _blob(h, w, by, bx, rng.uniform(16, 24) * s, rng.uniform(14, 20) * s)
        img += rng.uniform(0.32, 0.42) * blob * cv2.GaussianBlur(m.astype(np.float32), (0, 0), 4 * s)
    elif label == "COVID19":  # bilateral peripheral ground-glass opacities
        for side, m in lungs:
            for _ in range(rng.integers(2, 4)):
                by = cy + rng.uniform(0, 50) * s
                bx = cx + side * (off + rng.uniform(16, 30) * s)
                ggo = _blob(h, w, by, bx, rng.uniform(8, 14) * s, rng.uniform(6, 10) * s)
                texture = 0.6 + 0.4 * np.clip(_smooth_noise(rng, h, w, max(2, int(6 * s))), -1, 1)
                img += rng.uniform(0.14, 0.20) * ggo * texture * m

    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.03, 0.05)  # exposure
    img += 0.03 * _smooth_noise(rng, h, w, max(2, int(16 * s))) + rng.normal(0, 0.012, (h, w))
    out = np.clip(img * 255 / 0.8, 0, 255).astype(np.uint8)
    if marker:
        mk = _draw_marker(out, rng, marker_style)
        if masks is not None:
            masks["marker"] = mk
    if masks is not None:
        masks["lungs"] = lung_any > 0
        masks.setdefault("marker", np.zeros((h, w), bool))
    return out


def generate(cfg: SynthConfig) -> SynthResult:
    """Write ``n_per_class`` phantoms per class to ``cfg.out/<class>/`` (one folder per class)."""
    if cfg.shortcut_class is not None and cfg.shortcut_class not in cfg.classes:
        raise ValueError(f"shortcut_class {cfg.shortcut_class!r} is not one of {cfg.classes}")
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out)
    res = SynthResult(out=out)
    for label in cfg.classes:
        d = out / label
        d.mkdir(parents=True, exist_ok=True)
        res.marked[label] = 0
        for i in range(cfg.n_per_class):
            marker = cfg.marker_all or (label == cfg.shortcut_class and rng.random() < cfg.shortcut_prob)
            img = make_phantom(label, rng, cfg.size, marker=marker, marker_style=cfg.marker_style)
            cv2.imwrite(str(d / f"{label.lower()}_{i:05d}.{cfg.fmt}"), img)
            res.marked[label] += int(marker)
        res.counts[label] = cfg.n_per_class
    return res
