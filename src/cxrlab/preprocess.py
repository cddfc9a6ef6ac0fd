"""Deterministic preprocessing that travels in the bundle (applied before the transforms, in training and
inference alike). Today: optional burned-in text/marker removal (detector: ``cxrlab.data.textdetect``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def apply_preprocess(gray: np.ndarray, spec: dict[str, Any] | None) -> np.ndarray:
    """Apply the bundle/config preprocessing ``spec`` (``{"text_removal": "none"|"mask"|"inpaint"}``)."""
    mode = (spec or {}).get("text_removal", "none")
    if mode == "none":
        return gray
    from cxrlab.data.textdetect import remove_text

    return remove_text(gray, mode=mode)
