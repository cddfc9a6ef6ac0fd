"""Fitting the shift statistics (:mod:`cxrlab.analysis.shift`, :mod:`cxrlab.analysis.ood`) and storing them in a
bundle: ``train`` does it at the end of training (:func:`fit_from_datamodule`, :func:`save_statistics`);
:func:`fit_bundle` (``cxrlab sources fit``) for a bundle trained before, or with ``shift_stats: false``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrlab.analysis.ood import OodScorer, polarity
from cxrlab.analysis.shift import MAX_FIT_IMAGES, OOD_QUANTILE, POLARITY_QUANTILE, SHIFT_WEIGHTS, ShiftError
from cxrlab.config import field_default
from cxrlab.inference.settings import PredictSettings


def collect(
    model: torch.nn.Module, loader: Any, device: torch.device | str, channels_last: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, probabilities, labels) of every batch of ``loader`` ((x, y) batches)."""
    from cxrlab.inference.infer import forward_pass

    feats, probs, labels = [], [], []
    for x, y in loader:
        p, f = forward_pass(model, x.to(device), features=True, channels_last=channels_last)
        feats.append(f)
        probs.append(p)
        labels.append(np.asarray(y))
    return np.concatenate(feats), np.concatenate(probs), np.concatenate(labels)


# ------------------------------------------------------------------------------------------- fitting


def fit_statistics(
    classes: list[str],
    train_feats: np.ndarray,
    train_prior: Sequence[int],
    val_feats: np.ndarray,
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    train_polarity: np.ndarray | None = None,
    quantile: float = OOD_QUANTILE,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(the bundle's ``shift`` dict, the arrays for ``shift.safetensors``) from training and validation
    features, the training class counts and the validation predictions."""
    from sklearn.covariance import LedoitWolf

    k = len(classes)
    lw = LedoitWolf().fit(np.asarray(train_feats, np.float64))
    mean = lw.location_
    precision = lw.get_precision()
    scorer = OodScorer({}, mean, precision)
    val_dist = np.sort(scorer.distances(val_feats))
    n = len(val_dist)
    # split-conformal rank: an image exchangeable with the validation images exceeds it with P <= 1 - rank/(n+1)
    rank = min(n, math.ceil((n + 1) * quantile))
    threshold = float(val_dist[rank - 1])
    y_pred = np.asarray(val_probs).argmax(axis=1)
    cm = np.bincount(np.asarray(val_labels, np.int64) * k + y_pred, minlength=k * k).reshape(k, k)
    meta: dict[str, Any] = {
        "classes": list(classes),
        "val_confusion": cm.tolist(),
        "train_prior": [int(v) for v in train_prior],
        "n_train": int(np.sum(train_prior)),
        "n_val": int(cm.sum()),
        "ood": {
            "method": "Mahalanobis distance of penultimate features (Ledoit-Wolf covariance of training features)",
            "feature_dim": int(mean.shape[0]),
            "n_fit": int(len(train_feats)),
            "shrinkage": float(lw.shrinkage_),
            "quantile": quantile,
            "threshold": threshold,
            "expected_flag_rate": 1 - rank / (n + 1),
            "val_distance_median": float(np.median(val_dist)),
        },
    }
    if train_polarity is not None and len(train_polarity):
        meta["polarity_threshold"] = float(min(0.0, np.quantile(train_polarity, POLARITY_QUANTILE)))
    return meta, {"mean": mean.astype(np.float32), "precision": precision.astype(np.float32)}


def save_statistics(bundle_dir: str | Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write ``shift.safetensors`` and the ``shift`` field of ``bundle.json`` into a saved bundle."""
    from safetensors.numpy import save

    from cxrlab.atomic import write_bytes_atomic, write_json
    from cxrlab.runs import META_FILE

    d = Path(bundle_dir)
    write_bytes_atomic(d / SHIFT_WEIGHTS, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
    doc = json.loads((d / META_FILE).read_text())
    doc["shift"] = meta
    write_json(d / META_FILE, doc)


def fit_from_datamodule(model: torch.nn.Module, dm: Any, device: torch.device | str, seed: int = 0) -> tuple:
    """Shift statistics of a trained ``model`` from a datamodule's train and val splits (eval transform; at most
    ``MAX_FIT_IMAGES`` training images, a seeded sample)."""
    from torch.utils.data import DataLoader, Subset

    was_training = model.training
    model.eval()
    try:
        train_loader = dm.loader("train")
        ds = train_loader.dataset
        n = len(ds)
        idx = np.arange(n)
        if n > MAX_FIT_IMAGES:
            idx = np.sort(np.random.default_rng(seed).choice(n, MAX_FIT_IMAGES, replace=False))
            train_loader = DataLoader(Subset(ds, idx.tolist()), batch_size=train_loader.batch_size, shuffle=False)
        tf, _, _ = collect(model, train_loader, device)
        vf, vp, vy = collect(model, dm.loader("val"), device)
        pol = np.array([polarity(ds.image(int(i))) for i in idx])
    finally:
        model.train(was_training)
    return fit_statistics(dm.classes, tf, dm.class_counts("train"), vf, vp, vy, pol)


def fit_bundle(
    target: str | Path, data: str | Path | None = None, device: str = field_default(PredictSettings, "device")
) -> dict[str, Any]:
    """Fit and store the shift statistics of an existing bundle (``train`` does this itself; this is for bundles
    trained before, or with ``shift_stats: false``) from its training split or ``data`` (a split directory).
    Returns the ``shift`` dict written into the bundle."""
    from cxrlab.config import Config, build_config
    from cxrlab.data.datamodule import CXRDataModule, resolve_split
    from cxrlab.data.items import run_split_dir
    from cxrlab.inference.bundle import load_bundle, resolve_bundle_dir
    from cxrlab.inference.infer import resolve_device
    from cxrlab.runs import find_run_dir, read_summary

    bdir = resolve_bundle_dir(target)
    dev = resolve_device(device)
    bundle = load_bundle(bdir, device=dev)
    if data is None:
        run_dir = find_run_dir(bdir)
        data = run_split_dir(run_dir, read_summary(run_dir), bundle.meta.config or {})
        if data is None:
            raise ShiftError(f"{bdir} does not record its training split; pass the split directory (--data)")
    info = resolve_split(data)
    if list(info.classes) != list(bundle.meta.class_names):
        raise ShiftError(f"the split's classes {info.classes} are not the bundle's {bundle.meta.class_names}")
    m = bundle.meta
    known = {k: v for k, v in (m.config or {}).items() if k in Config.model_fields}
    # what the bundle owns wins over its stored config (a bare bundle may have none)
    own = {"img_size": list(m.img_size), "in_chans": m.in_chans, "preprocess": m.preprocess, "model_name": m.model_name}
    cfg = build_config(Config, {**known, **own, "data": str(info.root), "num_classes": None}, source=str(bdir))
    dm = CXRDataModule(cfg, info, bundle.meta.mean, bundle.meta.std)
    meta, arrays = fit_from_datamodule(bundle.model, dm, dev, seed=cfg.seed)
    save_statistics(bdir, meta, arrays)
    return meta
