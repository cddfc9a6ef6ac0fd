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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cxrlab.bundle import Bundle, load_bundle
from cxrlab.errors import CxrlabError

Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS = ("torch", "onnx", "onnx-int8")


class PredictError(CxrlabError):
    """Prediction cannot start (bad backend, no inputs, missing path)."""


@dataclass
class Prediction:
    """One input's result. ``error`` is None on success; otherwise ``label`` is None and ``probabilities`` empty."""

    path: str
    label: str | None
    probabilities: dict[str, float]
    error: str | None = None
    cam_path: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PredictError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e


def expand_inputs(paths: Iterable[str | Path]) -> list[tuple[Path, str | None]]:
    """Files as given and folders walked recursively (sorted) -> ``[(path, problem or None)]``.

    Inside folders, files with an image/DICOM extension (``cxrlab.data.io.IMAGE_EXTENSIONS``) and extension-less
    files (DICOM often has none) are taken; hidden files and other extensions (``.csv``, ``.txt`` ...) are
    skipped. A path given explicitly is always tried; one that does not exist is reported as a problem.
    """
    from cxrlab.data.io import IMAGE_EXTENSIONS

    out: list[tuple[Path, str | None]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if any(part.startswith(".") for part in rel) or not f.is_file():
                    continue
                if f.suffix.lower() in IMAGE_EXTENSIONS or f.suffix == "":
                    out.append((f, None))
        elif p.exists():
            out.append((p, None))
        else:
            out.append((p, "file not found"))
    return out


def _read_gray(path: Path) -> np.ndarray:
    from cxrlab.data.io import read_xray

    return read_xray(path, dtype="uint8")


def _reason(e: Exception) -> str:
    return str(getattr(e, "reason", None) or f"{type(e).__name__}: {e}")


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
        backend: Backend = "torch",
        device: str | torch.device = "auto",
        batch_size: int = 32,
        progress: bool | None = None,
        num_workers: int = 2,
    ) -> None:
        if backend not in BACKENDS:
            raise PredictError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        if batch_size < 1:
            raise PredictError(f"batch_size must be >= 1, got {batch_size}")
        self.backend: Backend = backend
        self.device = resolve_device(device)
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
        if backend in ("onnx", "onnx-int8"):
            from cxrlab.export import ensure_int8, ensure_onnx, onnx_session

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
        """Softmax probabilities (N x classes, float64 rows summing to 1) for a preprocessed batch."""
        if self._session is not None:
            from cxrlab.export import INPUT_NAME, OUTPUT_NAME

            logits = self._session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x.numpy(), np.float32)})[0]
            logits = torch.from_numpy(logits)
        else:
            with torch.inference_mode():
                x = x.to(self.device).contiguous(memory_format=torch.channels_last)
                logits = self.bundle.model(x).float().cpu()
        return torch.softmax(logits.double(), dim=1).numpy()

    def predict_proba(self, grays: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities (N x classes) for 2-D uint8 grayscale images, in batches of ``batch_size``."""
        out = [
            self.forward(torch.stack([self.preprocess(g) for g in grays[i : i + self.batch_size]]))
            for i in range(0, len(grays), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def to_prediction(self, name: str, probs: np.ndarray) -> Prediction:
        """A successful ``Prediction`` for ``name`` from one row of class probabilities."""
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
        probs = self.predict_proba(list(grays))
        return [self.to_prediction(n, p) for n, p in zip(names, probs, strict=True)]

    def predict(self, paths: Iterable[str | Path], cam_dir: str | Path | None = None) -> list[Prediction]:
        """Classify files and folders (recursive). Unreadable files come back with ``error`` set, in order.

        With ``cam_dir``, a Grad-CAM overlay PNG per image is written there and named in ``cam_path``.
        """
        from tqdm.auto import tqdm

        items = expand_inputs([paths] if isinstance(paths, str | Path) else paths)
        if not items:
            raise PredictError("no input images: pass image files or folders that contain images")
        cam_out = Path(cam_dir) if cam_dir is not None else None
        if cam_out is not None:
            cam_out.mkdir(parents=True, exist_ok=True)
        cam_names: set[str] = set()
        results: list[Prediction] = []

        def load(item: tuple[Path, str | None]) -> tuple[np.ndarray | None, torch.Tensor | None, str | None]:
            path, problem = item
            if problem is not None:
                return None, None, problem
            # A failure in one file (corrupt, unsupported, a decoder bug) must not end a run over thousands of
            # files: its reason goes into that file's row and the batch goes on.
            try:
                gray = _read_gray(path)
                return gray, self.preprocess(gray), None
            except Exception as e:
                return None, None, _reason(e)

        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        # disable=None: tqdm shows the bar only when stderr is a terminal
        disable = None if self.progress is None else not self.progress
        bar = tqdm(total=len(items), unit="img", desc="predict", disable=disable)
        # Decoding and resizing the next batch (PIL/pydicom/OpenCV release the GIL) overlaps the forward pass of
        # the current one; at most two batches of images are held in memory.
        with ThreadPoolExecutor(max_workers=self.num_workers) as pool, bar:
            pending = [pool.submit(load, it) for it in chunks[0]]
            for ci, chunk in enumerate(chunks):
                loaded = [f.result() for f in pending]
                pending = [pool.submit(load, it) for it in chunks[ci + 1]] if ci + 1 < len(chunks) else []
                good = [i for i, (_, t, _) in enumerate(loaded) if t is not None]
                probs = self.forward(torch.stack([loaded[i][1] for i in good])) if good else None
                cams = self.cam_overlays([loaded[i][0] for i in good]) if (good and cam_out is not None) else None
                for i, ((path, _), (_, _, err)) in enumerate(zip(chunk, loaded, strict=True)):
                    if err is not None:
                        results.append(Prediction(path=str(path), label=None, probabilities={}, error=err))
                        continue
                    k = good.index(i)
                    pred = self.to_prediction(str(path), probs[k])
                    if cams is not None:
                        out = _unique(cam_out, path, cam_names)
                        out.write_bytes(encode_png(cams[k]))
                        pred.cam_path = str(out)
                    results.append(pred)
                bar.update(len(chunk))
        return results

    # ---------------------------------------------------------------------------------------- Grad-CAM

    def cam_overlays(self, grays: Sequence[np.ndarray], max_side: int = 512) -> list[np.ndarray]:
        """Grad-CAM overlays (H x W x 3 uint8 RGB, longer side at most ``max_side``) of the predicted class.

        The CAM comes from ``cxrlab.explain.CamEngine`` (pytorch-grad-cam, target layer chosen automatically) on
        the bundle's preprocessed input and is drawn over the *original* image with ``cxrlab.explain.overlay``
        (the model input is a plain resize of it, so stretching the CAM back to the original shape is exact).
        Serialised and hooks removed afterwards: Grad-CAM hooks the shared model, which other threads may use.
        """
        import cv2

        from cxrlab.explain import CamEngine, overlay

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
