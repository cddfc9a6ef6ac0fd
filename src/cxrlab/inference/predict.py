"""Run a trained bundle on new images: files, folders (recursive) and DICOM, with the bundle's own preprocessing.

``Predictor`` loads the bundle once and then classifies lists of paths or in-memory grayscale arrays in batches.
A file that cannot be read (corrupt, not an image, unsupported DICOM) does not stop the run: it comes back as a
``Prediction`` with ``error`` set and no label, in input order with the others.

Backends:

- ``torch`` (default): the bundle's PyTorch model on ``device`` (``auto`` = CUDA when available, else CPU).
- ``onnx``: ONNX Runtime on the bundle's ONNX export. The export is made on first use and cached as
  ``<bundle>/model.onnx`` (what ``cxrlab export BUNDLE --format onnx`` writes); it is reused while the weights
  digest it records matches ``model.safetensors`` and re-exported otherwise, so it can never serve stale
  weights (a run checkpoint passed as the bundle caches ``<checkpoint>.onnx`` beside it). A read-only
  directory gets a per-process export in a temp directory. Preprocessing is the
  bundle's in every backend; only the network runs elsewhere.
- ``onnx-int8``: ONNX Runtime on the bundle's INT8 export (``model.int8.onnx``). It is never made implicitly
  (calibration needs the run's training images and the export checks test accuracy against float32): make it
  with ``cxrlab export RUN --format onnx --int8``; a missing or stale one is an error that says so.

Grad-CAM overlays (``cam_dir`` / ``cam_overlays``) always use the PyTorch model, whatever the backend.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrlab.config import field_default
from cxrlab.errors import CxrlabError
from cxrlab.inference.bundle import Bundle, load_bundle
from cxrlab.inference.infer import forward_pass, read_batches, resolve_device, softmax_rows
from cxrlab.inference.settings import BACKENDS, Backend, PredictSettings


class PredictError(CxrlabError):
    """Prediction cannot start (bad backend, no inputs, missing path)."""


NONFINITE_ERROR = (
    "the model gave non-finite output (NaN/inf) for this image: no label. The bundle's weights or its "
    "normalisation (mean/std in bundle.json) are broken; copy the bundle again from the run that made it"
)


@dataclass
class Prediction:
    """One input's result. ``error`` is None on success; otherwise ``label`` is None and ``probabilities`` empty."""

    path: str
    label: str | None
    probabilities: dict[str, float]
    error: str | None = None
    cam_path: str | None = None
    # out-of-distribution flag (cxrlab.analysis.shift): None when the bundle has no shift statistics
    ood: bool | None = None
    ood_score: float | None = None  # feature distance / threshold (> 1 flags); None without feature statistics
    ood_reasons: list[str] = field(default_factory=list)
    source: str | None = None  # where the image comes from (cxrlab.data.sources.input_sources), when asked

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Inputs:
    """What :func:`collect_inputs` found: ``items`` to classify (``(path, problem or None)``, a problem makes an
    error row) and ``ignored`` names with the reason they are not inputs (``(path, reason)``)."""

    items: list[tuple[Path, str | None]]
    ignored: list[tuple[Path, str]]


def collect_inputs(paths: Iterable[str | Path]) -> Inputs:
    """Files as given and folders walked recursively (sorted) with the walker ``data ingest`` uses
    (:mod:`cxrlab.data.walk`), so both stages see the same files.

    Inside folders, image candidates (an image/DICOM extension, or no extension and image content: the rule of
    ``data ingest``) are inputs; dangling symlinks and symlink loops are inputs with a problem (an error row);
    other files, hidden files and folders not searched (hidden, or a symlink back to a folder already searched)
    are ``ignored`` with their reason. A path given explicitly is always tried; one that does not exist is
    reported as a problem.
    """
    from cxrlab.data.walk import classify_file, walk

    items: list[tuple[Path, str | None]] = []
    ignored: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in walk(p):
                if f.verdict == "broken":
                    items.append((f.path, f.reason))
                elif f.verdict == "ignored":
                    ignored.append((f.path, f.reason))
                else:
                    why = classify_file(f.path)
                    if why is None:
                        items.append((f.path, None))
                    else:
                        ignored.append((f.path, why))
        elif p.exists():
            items.append((p, None))
        elif p.is_symlink():
            items.append((p, "dangling symlink or symlink loop: it leads to no file"))
        else:
            items.append((p, "file not found"))
    return Inputs(items, ignored)


def expand_inputs(paths: Iterable[str | Path]) -> list[tuple[Path, str | None]]:
    """The inputs of :func:`collect_inputs` (without the ignored names)."""
    return collect_inputs(paths).items


class Predictor:
    """Load a bundle once; classify images in batches.

    ``bundle_path``: a bundle directory, a run directory (its ``bundle/``) or a ``bundle.json``.
    ``backend``: ``torch``, ``onnx`` or ``onnx-int8`` (see module doc).
    ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    ``progress``: show a progress bar (None = only when stderr is a terminal).
    """

    def __init__(
        self,
        bundle_path: str | Path,
        backend: Backend = field_default(PredictSettings, "backend"),
        device: str | torch.device = field_default(PredictSettings, "device"),
        batch_size: int = field_default(PredictSettings, "batch_size"),
        progress: bool | None = None,
        num_workers: int = 2,
    ) -> None:
        if backend not in BACKENDS:
            raise PredictError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        if batch_size < 1:
            raise PredictError(f"batch_size must be >= 1, got {batch_size}")
        self.backend: Backend = backend
        self.device = resolve_device(device, PredictError)
        self.batch_size = batch_size
        self.progress = progress
        self.num_workers = max(1, num_workers)
        # The ONNX backend keeps the torch model on the CPU: it is only used for Grad-CAM there.
        self.bundle: Bundle = load_bundle(bundle_path, device=self.device if backend == "torch" else "cpu")
        if backend == "torch":
            # channels_last: measured 1.5-1.9x faster eager inference for timm CNNs here (bench_inference.py);
            # logits change by ~1e-5 (a different summation order), the weights do not change
            self.bundle.model.to(memory_format=torch.channels_last)
        self.meta = self.bundle.meta
        self.classes: list[str] = list(self.meta.class_names)
        self.onnx_path: Path | None = None
        self._session = None
        self._cam_lock = threading.Lock()
        self.ignored: list[tuple[str, str]] = []  # (path, reason) of the last predict(): files that are not inputs
        from cxrlab.analysis.ood import load_scorer

        # label-shift / OOD statistics stored at training (None for bundles trained before they existed)
        self.ood = load_scorer(self.bundle.path, self.meta)
        if backend in ("onnx", "onnx-int8"):
            from cxrlab.inference.export import ensure_onnx, onnx_session
            from cxrlab.inference.quantize import ensure_int8

            self.onnx_path = ensure_onnx(self.bundle) if backend == "onnx" else ensure_int8(self.bundle)
            self._session = onnx_session(self.onnx_path, device=str(self.device))

    # ------------------------------------------------------------------------------------------ info

    @property
    def model_info(self) -> dict[str, Any]:
        """What produced a prediction: model name, run id, versions, classes, backend."""
        import cxrlab

        m = self.meta
        return {
            "name": m.model_name,
            "run_id": m.run_id or None,
            "created": m.created,
            "cxrlab_version": m.cxrlab_version or cxrlab.__version__,
            "classes": self.classes,
            "img_size": list(m.img_size),
            "backend": self.backend,
            "dataset_version": m.dataset_version,
        }

    # ------------------------------------------------------------------------------------- inference

    def preprocess(self, gray: np.ndarray) -> torch.Tensor:
        """The bundle's preprocessing (text removal hook + eval transform) for one 2-D uint8 image."""
        return self.bundle.preprocess(gray)

    def forward(self, x: torch.Tensor) -> np.ndarray:
        """Softmax probabilities (N x classes, float64 rows summing to 1) for a preprocessed batch: ONNX Runtime,
        or the torch model through :func:`cxrlab.inference.infer.forward_pass`."""
        if self._session is not None:
            from cxrlab.inference.export import INPUT_NAME, OUTPUT_NAME

            logits = self._session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x.numpy(), np.float32)})[0]
            return softmax_rows(logits)
        return forward_pass(self.bundle.model, x, channels_last=True)[0]

    def forward_scored(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, penultimate features or None): features when the bundle has feature statistics and
        the torch backend runs (one forward pass either way); ONNX gives probabilities only."""
        if self._session is not None or self.ood is None or not self.ood.has_features:
            return self.forward(x), None
        return forward_pass(self.bundle.model, x, features=True, channels_last=True)

    def flag(
        self,
        preds: Sequence[Prediction],
        feats: np.ndarray | None,
        grays: Sequence[np.ndarray],
        colours: Sequence[float] | None = None,
    ) -> None:
        """Set the OOD fields of ``preds`` (successful predictions of ``grays``, in order) in place."""
        if self.ood is None:
            return
        for p, r in zip(preds, self.ood.score(feats, grays, colours), strict=True):
            if p.ok:  # a non-finite output is already an error, not a prediction to flag
                p.ood, p.ood_score, p.ood_reasons = r.flag, r.score, r.reasons

    def label_shift(self, preds: Sequence[Prediction]):  # -> cxrlab.analysis.shift.LabelShift | None
        """The label-shift check over a set of predictions (None without shift statistics)."""
        if self.ood is None or "val_confusion" not in self.ood.meta:
            return None
        from cxrlab.analysis.shift import label_shift

        counts = [sum(p.label == c for p in preds if p.ok) for c in self.classes]
        return label_shift(counts, self.ood.meta)

    def predict_proba(self, grays: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities (N x classes) for 2-D uint8 grayscale images, in batches of ``batch_size``."""
        out = [
            self.forward(torch.stack([self.preprocess(g) for g in grays[i : i + self.batch_size]]))
            for i in range(0, len(grays), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def to_prediction(self, name: str, probs: np.ndarray) -> Prediction:
        """The ``Prediction`` for ``name`` from one row of class probabilities: an error (no label) when the row is
        not finite, so a broken model can never pass a NaN off as a confident label."""
        if not np.all(np.isfinite(probs)):
            return Prediction(path=name, label=None, probabilities={}, error=NONFINITE_ERROR)
        return Prediction(
            path=name,
            label=self.classes[int(np.argmax(probs))],
            probabilities={c: float(p) for c, p in zip(self.classes, probs, strict=True)},
        )

    def predict_arrays(self, grays: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[Prediction]:
        """Classify in-memory 2-D uint8 grayscale images (``names`` label the results; default ``array[i]``)."""
        names = list(names) if names is not None else [f"array[{i}]" for i in range(len(grays))]
        if len(names) != len(grays):
            raise PredictError(f"{len(names)} names for {len(grays)} images")
        out: list[Prediction] = []
        for i in range(0, len(grays), self.batch_size):
            chunk = list(grays[i : i + self.batch_size])
            probs, feats = self.forward_scored(torch.stack([self.preprocess(g) for g in chunk]))
            preds = [self.to_prediction(n, p) for n, p in zip(names[i : i + self.batch_size], probs, strict=True)]
            self.flag(preds, feats, chunk)
            out += preds
        return out

    def predict(self, paths: Iterable[str | Path], cam_dir: str | Path | None = None) -> list[Prediction]:
        """Classify files and folders (recursive). Unreadable files come back with ``error`` set, in order; files
        in the folders that are not inputs are listed in ``self.ignored`` with the reason (see ``collect_inputs``).
        A ``path`` whose name is not valid UTF-8 is reported with ``\\xNN`` escapes (``display_path``).

        With ``cam_dir``, a Grad-CAM overlay PNG per image is written there and named in ``cam_path``.
        """
        from cxrlab.data.walk import display_path

        found = collect_inputs([paths] if isinstance(paths, str | Path) else paths)
        self.ignored = [(display_path(p), why) for p, why in found.ignored]
        if not found.items:
            what = f" ({len(self.ignored)} file(s) there are not images)" if self.ignored else ""
            raise PredictError(f"no input images{what}: pass image files or folders that contain images")
        files = [p for p, _ in found.items]
        names = [display_path(p) for p in files]
        cam_out = Path(cam_dir) if cam_dir is not None else None
        if cam_out is not None:
            cam_out.mkdir(parents=True, exist_ok=True)
        cam_names: set[str] = set()
        results: list[Prediction] = []
        batches = read_batches(
            files,
            self.batch_size,
            [],
            progress=self.progress,
            colour=self.ood is not None,
            prepare=self.preprocess,
            workers=self.num_workers,
            problems=[why for _, why in found.items],
        )
        for batch in batches:
            rows = {i: Prediction(path=names[i], label=None, probabilities={}, error=why) for i, why in batch.failed}
            if batch.indices:
                probs, feats = self.forward_scored(batch.stack())
                preds = [self.to_prediction(names[i], p) for i, p in zip(batch.indices, probs, strict=True)]
                self.flag(preds, feats, batch.grays, batch.colours)
                if cam_out is not None:
                    for i, pred, cam in zip(batch.indices, preds, self.cam_overlays(batch.grays), strict=True):
                        if pred.ok:
                            out = _unique(cam_out, files[i], cam_names)
                            out.write_bytes(encode_png(cam))
                            pred.cam_path = str(out)
                rows.update(zip(batch.indices, preds, strict=True))
            results += [rows[i] for i in sorted(rows)]
        return results

    # ---------------------------------------------------------------------------------------- Grad-CAM

    def cam_overlays(self, grays: Sequence[np.ndarray], max_side: int = 512) -> list[np.ndarray]:
        """Grad-CAM overlays (H x W x 3 uint8 RGB, longer side at most ``max_side``) of the predicted class.

        The CAM comes from ``cxrlab.analysis.cam.CamEngine`` (pytorch-grad-cam, target layer chosen automatically)
        on the bundle's preprocessed input and is drawn over the *original* image with
        ``cxrlab.analysis.cam.overlay``
        (the model input is a plain resize of it, so stretching the CAM back to the original shape is exact).
        Serialised and hooks removed afterwards: Grad-CAM hooks the shared model, which other threads may use.
        """
        import cv2

        from cxrlab.analysis.cam import CamEngine, overlay

        if not grays:
            return []
        x = torch.stack([self.preprocess(g) for g in grays])
        with self._cam_lock, CamEngine(self.bundle.model, None, "gradcam", (1, *x.shape[1:])) as engine:
            cams, _ = engine(x)
        out = []
        for g, cam in zip(grays, cams, strict=True):
            _, bgr = overlay(g, cam, None, min(max_side, max(g.shape)))
            out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        return out


def _unique(cam_dir: Path, path: Path, used: set[str]) -> Path:
    """``<stem>.cam.png`` in ``cam_dir``, with ``-2``, ``-3`` ... when two inputs share a stem."""
    base, n = path.stem, 1
    name = f"{base}.cam.png"
    while name in used:
        n += 1
        name = f"{base}-{n}.cam.png"
    used.add(name)
    return cam_dir / name


def encode_png(rgb: np.ndarray) -> bytes:
    """An overlay (HxWx3 RGB uint8, or float 0..1) as PNG bytes."""
    import cv2

    img = np.asarray(rgb)
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise PredictError("cannot encode the Grad-CAM overlay as PNG")
    return buf.tobytes()
