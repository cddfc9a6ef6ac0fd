"""Model bundle: safetensors weights + JSON metadata. No pickle anywhere.

The bundle owns its preprocessing (house style 3): model name, class names, image size, channels,
normalisation and deterministic preprocessing travel with the weights, so evaluate / predict / serve can
never drift from training. Layout::

    bundle/
      model.safetensors
      bundle.json
      shift.safetensors   label-shift / out-of-distribution feature statistics (cxrlab.shift), when fitted
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cxrlab.errors import CxrlabError

BUNDLE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "bundle.json"


class BundleError(CxrlabError):
    """A bundle is missing, incomplete or does not match its weights."""


@dataclass
class BundleMeta:
    model_name: str
    class_names: list[str]
    img_size: tuple[int, int]  # (height, width)
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    preprocess: dict[str, Any] = field(default_factory=lambda: {"text_removal": "none"})
    dataset_version: str = "unknown"
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    cxrlab_version: str = ""
    timm_version: str = ""
    format: int = BUNDLE_FORMAT
    # label-shift / OOD reference (cxrlab.shift): class names, validation confusion matrix, training prior,
    # feature-distance and polarity thresholds; the feature statistics are in shift.safetensors beside it
    shift: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BundleMeta:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        missing = [k for k in ("model_name", "class_names", "img_size", "in_chans", "mean", "std") if k not in known]
        if missing:
            raise BundleError(f"bundle metadata lacks {missing}")
        known["img_size"] = tuple(known["img_size"])
        known["mean"], known["std"] = tuple(known["mean"]), tuple(known["std"])
        return cls(**known)


def create_model(meta: BundleMeta) -> torch.nn.Module:
    """An uninitialised timm model with the bundle's architecture (no weight download)."""
    import timm

    return timm.create_model(meta.model_name, pretrained=False, num_classes=meta.num_classes, in_chans=meta.in_chans)


def save_bundle(model: torch.nn.Module, meta: BundleMeta, out_dir: str | Path) -> Path:
    """Write ``model``'s weights and ``meta`` to ``out_dir``; returns the directory."""
    import timm

    import cxrlab

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta.cxrlab_version = meta.cxrlab_version or cxrlab.__version__
    meta.timm_version = meta.timm_version or timm.__version__
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"model_name": meta.model_name})
    (out / META_FILE).write_text(json.dumps(meta.to_json(), indent=2))
    return out


def resolve_bundle_dir(path: str | Path) -> Path:
    """Accept a bundle dir, a run dir (uses its ``bundle/``) or the bundle.json path."""
    p = Path(path)
    if p.is_file() and p.name == META_FILE:
        p = p.parent
    for cand in (p, p / "bundle"):
        if (cand / META_FILE).is_file():
            return cand
    if not p.exists():
        raise BundleError(f"bundle not found: {p}")
    raise BundleError(f"{p} holds no model bundle ({META_FILE} + {WEIGHTS_FILE}); pass a run or bundle directory")


@dataclass
class Bundle:
    meta: BundleMeta
    model: torch.nn.Module
    path: Path
    weights_path: Path | None = None  # where the weights came from: path/model.safetensors, or a .ckpt/.pt

    @functools.cached_property
    def _eval_transform(self):  # -> albumentations.Compose, built once per bundle
        from cxrlab.augment import eval_transform

        return eval_transform(self.meta.img_size, self.meta.mean, self.meta.std)

    def transform(self):  # -> albumentations.Compose
        return self._eval_transform

    def preprocess(self, gray: np.ndarray) -> torch.Tensor:
        """One 2-D uint8 grayscale image -> CxHxW float tensor, exactly as in training's eval path."""
        from cxrlab.augment import to_channels
        from cxrlab.preprocess import apply_preprocess

        gray = apply_preprocess(gray, self.meta.preprocess)
        return self.transform()(image=to_channels(gray, self.meta.in_chans))["image"]

    @torch.no_grad()
    def predict_proba(self, grays: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Softmax probabilities (N x num_classes) for 2-D uint8 grayscale images."""
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(grays), batch_size):
            x = torch.stack([self.preprocess(g) for g in grays[i : i + batch_size]]).to(device)
            out.append(torch.softmax(self.model(x).float(), dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.meta.num_classes), dtype=np.float32)


CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


class UntrustedCheckpointError(BundleError):
    """A .ckpt/.pt file holds pickled objects that ``torch.load(weights_only=True)`` refuses to run."""


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a Lightning ``.ckpt`` or a plain ``.pt``/``.pth`` state dict, read with
    ``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickled code.

    A file that needs more than that is refused with ``UntrustedCheckpointError``. Lightning's ``model.`` prefix
    (``CXRClassifier.model``) is removed.
    """
    import pickle

    p = Path(path)
    if not p.is_file():
        raise BundleError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UntrustedCheckpointError(
            f"refusing to load {p}: it contains pickled Python objects other than tensors ({first}). Unpickling "
            "them could run arbitrary code. Use the run's bundle/ (safetensors + JSON) instead; only for a file "
            "you trust, re-save its state_dict with torch.save(model.state_dict(), ...)"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise BundleError(f"{p} is not a readable PyTorch checkpoint: {e}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"{p} holds no model state_dict (expected a Lightning .ckpt or a dict of tensors)")
    if all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    return state


def _bundle_dir_for_checkpoint(ckpt: Path) -> Path:
    """The bundle whose metadata describes a run's checkpoint (``runs/<id>/checkpoints/x.ckpt`` -> ``runs/<id>``)."""
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    try:
        return resolve_bundle_dir(run_dir)
    except BundleError:
        raise BundleError(
            f"{ckpt} has no bundle.json beside it (looked in {run_dir} and {run_dir / 'bundle'}): a checkpoint "
            "needs its run's bundle metadata (model, classes, preprocessing); pass the run's bundle/ instead"
        ) from None


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle (no pickle). Mismatched weights raise BundleError naming the keys.

    ``path`` may also be a run's ``.ckpt``/``.pt`` checkpoint: its weights are read with ``weights_only=True``
    (see ``load_checkpoint_state``) and the metadata comes from the run's bundle.
    """
    ckpt = Path(path) if Path(path).suffix.lower() in CHECKPOINT_SUFFIXES else None
    d = _bundle_dir_for_checkpoint(ckpt) if ckpt is not None else resolve_bundle_dir(path)
    try:
        meta = BundleMeta.from_json(json.loads((d / META_FILE).read_text()))
    except json.JSONDecodeError as e:
        raise BundleError(f"{d / META_FILE} is not valid JSON: {e}") from e
    wpath = ckpt if ckpt is not None else d / WEIGHTS_FILE
    if not wpath.is_file():
        raise BundleError(f"bundle {d} has no {WEIGHTS_FILE}")
    model = create_model(meta)
    state = load_checkpoint_state(wpath) if ckpt is not None else load_file(str(wpath))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BundleError(
            f"weights in {wpath} do not match {meta.model_name}: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    model.eval().to(device)
    return Bundle(meta=meta, model=model, path=d, weights_path=wpath)
