"""Deterministic preprocessing that travels in the bundle (applied before the transforms, in training and
inference alike), in this order:

1. ``text_removal``: burned-in text/marker removal (detector: ``cxrlab.data.textdetect``);
2. ``crop: lungs``: crop to the bounding box of the lung fields (``cxrlab.analysis.lungs.segment_lungs``) plus a 10%
   margin, so the borders (collimation, labels, the body outline) that differ between hospitals are cut away;
3. ``pad_square``: pad to a square with black (air) instead of letting the resize squash the aspect ratio, which
   otherwise tells one source's 224x224 copies from another's portrait originals;
4. ``intensity``: per-image intensity standardisation: ``equalize`` (global histogram equalisation) or
   ``clahe`` (contrast-limited adaptive histogram equalisation, 8x8 tiles, clip limit 2), so exposure and
   contrast that differ by scanner carry less of the source.

Steps 2-4 are source-shift mitigations (issue #15); they change what Grad-CAM maps back onto the original image
(explain assumes a plain resize), so read the overlays of such a model with that in mind.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CROP_MARGIN = 0.10  # of the lung box's size, on every side


def crop_to_lungs(gray: np.ndarray) -> np.ndarray:
    """The lung fields' bounding box (plus ``CROP_MARGIN``); the whole image when only the prior was found."""
    from cxrlab.analysis.lungs import segment_lungs

    m = segment_lungs(gray)
    if m.method == "prior" or not m.mask.any():
        return gray
    ys, xs = np.nonzero(m.mask)
    h, w = gray.shape
    dy, dx = (ys.max() - ys.min()) * CROP_MARGIN, (xs.max() - xs.min()) * CROP_MARGIN
    y0, y1 = max(0, int(ys.min() - dy)), min(h, int(ys.max() + dy) + 1)
    x0, x1 = max(0, int(xs.min() - dx)), min(w, int(xs.max() + dx) + 1)
    return np.ascontiguousarray(gray[y0:y1, x0:x1])


def pad_to_square(gray: np.ndarray) -> np.ndarray:
    """Centre the image on a black square of its longer side."""
    h, w = gray.shape
    if h == w:
        return gray
    n = max(h, w)
    out = np.zeros((n, n), gray.dtype)
    y, x = (n - h) // 2, (n - w) // 2
    out[y : y + h, x : x + w] = gray
    return out


def standardise_intensity(gray: np.ndarray, mode: str) -> np.ndarray:
    """``equalize``: global histogram equalisation; ``clahe``: CLAHE (8x8 tiles, clip 2.0)."""
    import cv2

    g = np.ascontiguousarray(gray, np.uint8)
    if mode == "equalize":
        return cv2.equalizeHist(g)
    if mode == "clahe":
        return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(g)
    raise ValueError(f"unknown intensity mode {mode!r}; valid: none, equalize, clahe")


def apply_preprocess(gray: np.ndarray, spec: dict[str, Any] | None) -> np.ndarray:
    """Apply the bundle/config preprocessing ``spec`` (``PreprocessConfig`` as a dict; missing keys are off, so
    bundles saved before a step existed keep their behaviour)."""
    spec = spec or {}
    mode = spec.get("text_removal", "none")
    if mode != "none":
        from cxrlab.data.textdetect import remove_text

        gray = remove_text(gray, mode=mode)
    if spec.get("crop", "none") == "lungs":
        gray = crop_to_lungs(gray)
    if spec.get("pad_square", False):
        gray = pad_to_square(gray)
    if spec.get("intensity", "none") != "none":
        gray = standardise_intensity(gray, spec["intensity"])
    return gray
