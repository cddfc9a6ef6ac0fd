"""Grad-CAM on any timm CNN and the attention it puts on image regions: the target layer, the predicted-class
margin, ``CamEngine`` (pytorch-grad-cam), lung/text/border region masks, attention shares and overlays.
``cxrlab.analysis.explain`` runs it over a data set; ``cxrlab.inference.predict`` uses it for single images."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from cxrlab.errors import ExplainError

METHODS = ("gradcam", "gradcam++")
CAM_TARGETS = ("margin", "logit")
REGIONS = ("in_lungs", "on_text", "on_border")
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
