"""Model bundle: safetensors weights + JSON metadata. No pickle anywhere.

The bundle owns its preprocessing (house style 3): model name, class names, image size, channels,
normalisation and deterministic preprocessing travel with the weights, so evaluate / predict / serve can
never drift from training. Layout::

    bundle/
      model.safetensors
      bundle.json
      shift.safetensors   label-shift / out-of-distribution feature statistics (cxrlab.analysis.shift), when fitted
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
from cxrlab.runs import BUNDLE_DIR, META_FILE, WEIGHTS_FILE, run_dir_of_checkpoint

BUNDLE_FORMAT = 1


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
    # sha256 of model.safetensors, written by save_bundle and checked by load_bundle ("" in bundles made before
    # the check existed: those load unchecked)
    weights_sha256: str = ""
    # label-shift / OOD reference (cxrlab.analysis.shift): class names, validation confusion matrix, training prior,
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
    def from_json(cls, d: dict[str, Any], source: str = META_FILE) -> BundleMeta:
        """Metadata from ``bundle.json``'s dict; a wrong type or value raises ``BundleError`` naming ``source``."""
        if not isinstance(d, dict):
            raise BundleError(f"{source} holds {type(d).__name__}, not a JSON object: it is not a cxrlab bundle.json")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        missing = [k for k in ("model_name", "class_names", "img_size", "in_chans", "mean", "std") if k not in known]
        if missing:
            raise BundleError(f"{source} lacks {missing}: it is not a complete cxrlab bundle.json")
        if not isinstance(known["class_names"], list):
            raise BundleError(f"{source}: class_names must be a list of names, got {known['class_names']!r}")
        try:
            known["img_size"] = tuple(int(v) for v in known["img_size"])
            known["mean"] = tuple(float(v) for v in known["mean"])
            known["std"] = tuple(float(v) for v in known["std"])
            known["in_chans"] = int(known["in_chans"])
            known["class_names"] = list(known["class_names"])
        except (TypeError, ValueError) as e:
            raise BundleError(
                f"{source}: img_size, mean, std, in_chans or class_names has the wrong type ({e})"
            ) from None
        meta = cls(**known)
        meta.validate(source)
        return meta

    def validate(self, source: str = META_FILE) -> None:
        """Values that would make every prediction wrong or NaN raise ``BundleError`` (checked on save and load)."""
        names = self.class_names
        if not isinstance(self.model_name, str) or not self.model_name:
            raise BundleError(f"{source}: model_name must be a non-empty string, got {self.model_name!r}")
        if not names or not all(isinstance(c, str) and c for c in names):
            raise BundleError(f"{source}: class_names must be a non-empty list of names, got {names!r}")
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise BundleError(
                f"{source}: class_names {names} repeat {dup}: each class needs a distinct name (the labels would "
                "be ambiguous); fix class_names to the training data's classes"
            )
        if len(self.img_size) != 2 or min(self.img_size) < 1:
            raise BundleError(f"{source}: img_size must be [height, width] > 0, got {list(self.img_size)}")
        if self.in_chans < 1:
            raise BundleError(f"{source}: in_chans must be at least 1, got {self.in_chans}")
        for key, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) not in (1, self.in_chans) or not all(np.isfinite(vals)):
                raise BundleError(
                    f"{source}: {key} {list(vals)} must be {self.in_chans} finite numbers (one per input channel)"
                )
        if not all(v > 0 for v in self.std):
            raise BundleError(
                f"{source}: std {list(self.std)} has a value <= 0: normalising by it gives inf/NaN inputs and "
                "meaningless predictions; restore the std the model was trained with"
            )


def create_model(meta: BundleMeta) -> torch.nn.Module:
    """An uninitialised timm model with the bundle's architecture (no weight download)."""
    import timm

    return timm.create_model(meta.model_name, pretrained=False, num_classes=meta.num_classes, in_chans=meta.in_chans)


def save_bundle(model: torch.nn.Module, meta: BundleMeta, out_dir: str | Path) -> Path:
    """Write ``model``'s weights and ``meta`` to ``out_dir``; returns the directory."""
    import timm

    import cxrlab

    meta.validate(f"bundle metadata for {out_dir}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta.cxrlab_version = meta.cxrlab_version or cxrlab.__version__
    meta.timm_version = meta.timm_version or timm.__version__
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # each file appears whole or not at all (a crash mid-save leaves no truncated weights behind a valid json)
    from cxrlab.atomic import atomic_path, write_json

    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"model_name": meta.model_name})
        meta.weights_sha256 = file_sha256(tmp)
    write_json(out / META_FILE, meta.to_json())
    return out


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_bundle_dir(path: str | Path) -> Path:
    """Accept a bundle dir, a run dir (uses its ``bundle/``) or the bundle.json path."""
    p = Path(path)
    if p.is_file() and p.name == META_FILE:
        p = p.parent
    for cand in (p, p / BUNDLE_DIR):
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
        from cxrlab.transforms import eval_transform

        return eval_transform(self.meta.img_size, self.meta.mean, self.meta.std, self.meta.in_chans)

    def transform(self):  # -> albumentations.Compose
        return self._eval_transform

    def preprocess(self, gray: np.ndarray) -> torch.Tensor:
        """One 2-D uint8 grayscale image -> CxHxW float tensor, exactly as in training's eval path."""
        from cxrlab.preprocess import apply_preprocess

        return self.model_input(apply_preprocess(gray, self.meta.preprocess))

    def model_input(self, preprocessed: np.ndarray) -> torch.Tensor:
        """The second half of :meth:`preprocess`, for a caller that keeps the preprocessed gray (explain shows it):
        the eval transform list (resize, channels, normalisation)."""
        return self.transform()(image=preprocessed)["image"]

    def predict_proba(self, grays: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Softmax probabilities (N x num_classes) for 2-D uint8 grayscale images."""
        from cxrlab.inference.infer import forward_pass

        out = [
            forward_pass(self.model, torch.stack([self.preprocess(g) for g in grays[i : i + batch_size]]))[0]
            for i in range(0, len(grays), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.meta.num_classes))


CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


class UntrustedCheckpointError(BundleError):
    """A .ckpt/.pt file holds pickled objects that ``torch.load(weights_only=True)`` refuses to run."""


class CheckpointError(BundleError):
    """A .ckpt/.pt file cannot be read (missing, truncated, damaged) or is not what was asked for; ``.path`` names
    it, ``.reason`` says why in one line and ``.untrusted`` is set when it holds pickled code."""

    def __init__(self, path: str | Path, reason: str, untrusted: bool = False) -> None:
        self.path, self.reason, self.untrusted = Path(path), reason, untrusted
        super().__init__(f"{path} is not a readable PyTorch checkpoint: {reason}")


def read_checkpoint(path: str | Path, lightning: bool = False) -> dict[str, Any]:
    """The one reader of PyTorch checkpoint files (a Lightning ``.ckpt``, a ``.pt``/``.pth``): the dict in it, read
    with ``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickled code.

    Raises ``CheckpointError`` (with ``untrusted`` set for a file that needs more than ``weights_only`` allows);
    ``lightning``: the dict must also be a Lightning checkpoint (``state_dict`` and ``epoch``: what resuming and
    the best epoch's weights need)."""
    import pickle

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "file not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(p, first, untrusted=True) from None
    except Exception as e:  # a truncated zip, an I/O error, a damaged record: all mean "cannot be read"
        raise CheckpointError(p, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(p, f"it holds a {type(obj).__name__}, not a dict of tensors")
    if lightning and ("state_dict" not in obj or "epoch" not in obj):
        raise CheckpointError(p, "not a Lightning checkpoint (no state_dict/epoch)")
    return obj


def read_state_dict(
    path: str | Path,
    error: type[CxrlabError] = BundleError,
    untrusted: type[CxrlabError] = UntrustedCheckpointError,
    advice: str = "Use the run's bundle/ (safetensors + JSON) instead; only for a file you trust, re-save its "
    "state_dict with torch.save(model.state_dict(), ...)",
) -> dict[str, torch.Tensor]:
    """The one weights reader: the tensors of a ``.safetensors`` file, a Lightning ``.ckpt`` or a ``.pt``/``.pth``
    state dict (also under a ``state_dict``/``model``/EMA key), with the ``model.``/``module.`` prefix of Lightning
    and DDP removed.

    Torch files are read by :func:`read_checkpoint` (``weights_only=True``); a file that needs more is refused with
    ``untrusted`` (``advice`` says what to do instead). Any other failure raises ``error`` (each caller passes its
    stage's error type).
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"weights file not found: {p}")
    if p.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            first = " ".join(str(e).split())[:200]
            raise error(f"{p} is not a readable safetensors file ({first}): it is truncated or damaged") from None
    try:
        obj = read_checkpoint(p)
    except CheckpointError as e:
        if e.untrusted:
            raise untrusted(
                f"refusing to load {p}: it contains pickled Python objects other than tensors ({e.reason}). "
                f"Unpickling them could run arbitrary code, so they are never loaded. {advice}"
            ) from None
        raise error(str(e)) from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
        for prefix in ("module.", "model."):  # DDP / Lightning (CXRClassifier.model) prefix every model key
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
        return tensors
    raise error(f"{p} holds no model state_dict (expected a Lightning .ckpt or a dict of tensors)")


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a run's ``.ckpt``/``.pt``/``.pth`` (see ``read_state_dict``); a file that holds more than
    tensors is refused with ``UntrustedCheckpointError``."""
    p = Path(path)
    if not p.is_file():
        raise BundleError(f"checkpoint not found: {p}")
    return read_state_dict(p)


def _bundle_dir_for_checkpoint(ckpt: Path) -> Path:
    """The bundle whose metadata describes a run's checkpoint (``runs/<id>/checkpoints/x.ckpt`` -> ``runs/<id>``)."""
    run_dir = run_dir_of_checkpoint(ckpt)
    try:
        return resolve_bundle_dir(run_dir)
    except BundleError:
        raise BundleError(
            f"{ckpt} has no {META_FILE} beside it (looked in {run_dir} and {run_dir / BUNDLE_DIR}): a checkpoint "
            "needs its run's bundle metadata (model, classes, preprocessing); pass the run's bundle/ instead"
        ) from None


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle (no pickle). Mismatched weights raise BundleError naming the keys.

    ``path`` may also be a run's ``.ckpt``/``.pt`` checkpoint: its weights are read with ``weights_only=True``
    (see ``load_checkpoint_state``) and the metadata comes from the run's bundle.
    """
    ckpt = Path(path) if Path(path).suffix.lower() in CHECKPOINT_SUFFIXES else None
    d = _bundle_dir_for_checkpoint(ckpt) if ckpt is not None else resolve_bundle_dir(path)
    meta_path = d / META_FILE
    try:
        meta = BundleMeta.from_json(json.loads(meta_path.read_text(encoding="utf-8")), source=str(meta_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_path} is not valid JSON ({e}); the bundle is damaged: copy it again") from None
    except OSError as e:
        raise BundleError(f"cannot read {meta_path}: {e.strerror or e}") from None
    wpath = ckpt if ckpt is not None else d / WEIGHTS_FILE
    if not wpath.is_file():
        raise BundleError(f"bundle {d} has no {WEIGHTS_FILE}")
    model = _create_for_bundle(meta, meta_path)
    if ckpt is not None:
        state = load_checkpoint_state(wpath)
    else:
        if meta.weights_sha256:
            actual = file_sha256(wpath)
            if actual != meta.weights_sha256:
                raise BundleError(
                    f"{wpath} does not match its bundle.json: sha256 {actual[:16]}... but {META_FILE} records "
                    f"{meta.weights_sha256[:16]}... The weights were changed or damaged after the bundle was saved: "
                    "copy the bundle again from the run that made it"
                )
        state = _read_safetensors(wpath)
    _load_weights(model, state, meta, wpath)
    model.eval().to(device)
    return Bundle(meta=meta, model=model, path=d, weights_path=wpath)


def _create_for_bundle(meta: BundleMeta, meta_path: Path) -> torch.nn.Module:
    import timm

    if ":" not in meta.model_name and not timm.is_model(meta.model_name):
        raise BundleError(
            f"{meta_path} names model_name {meta.model_name!r}, which this timm ({timm.__version__}) does not know: "
            "the bundle.json was edited or comes from a newer timm; restore the model_name it was trained with"
        )
    try:
        return create_model(meta)
    except Exception as e:  # timm's errors for impossible settings (e.g. in_chans) are plain RuntimeError/ValueError
        raise BundleError(
            f"cannot build {meta.model_name} with {meta.num_classes} classes and in_chans={meta.in_chans} from "
            f"{meta_path}: {type(e).__name__}: {e}"
        ) from None


def _read_safetensors(wpath: Path) -> dict[str, torch.Tensor]:
    try:
        return read_state_dict(wpath)
    except BundleError as e:
        raise BundleError(f"{e}; copy the bundle again from the run that made it") from None


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], meta: BundleMeta, wpath: Path) -> None:
    """Load ``state`` into ``model``; any difference in keys or shapes raises ``BundleError`` saying which field of
    bundle.json (model_name, class count, in_chans) disagrees with the weights."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise BundleError(
            f"weights in {wpath} do not match model_name={meta.model_name!r} in {META_FILE}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; the weights come from another architecture (fix model_name to the one "
            "the bundle was trained with)"
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        hint = ""
        head_w = wrong[-1]
        if len(head_w[1]) >= 1 and len(head_w[1]) == len(head_w[2]) and head_w[1][1:] == head_w[2][1:]:
            hint = (
                f"; the weights have {head_w[1][0]} outputs but {META_FILE} lists {meta.num_classes} class_names"
                if head_w[2][0] == meta.num_classes
                else ""
            )
        first = wrong[0]
        if len(first[1]) == 4 and first[1][0] == first[2][0] and first[1][1] != first[2][1]:
            hint = f"; the weights take {first[1][1]} input channels but {META_FILE} says in_chans={meta.in_chans}"
        shapes = ", ".join(f"{k}: {a} in the file, {b} expected" for k, a, b in wrong[:3])
        raise BundleError(
            f"weights in {wpath} do not match {META_FILE} ({meta.model_name}, {meta.num_classes} classes, "
            f"in_chans={meta.in_chans}): {shapes}{hint}. bundle.json and the weights must come from the same run"
        )
    model.load_state_dict(state, strict=True)
