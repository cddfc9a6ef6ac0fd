"""Classification statistics on arrays: confusion matrices, macro metrics, seeded percentile bootstrap CIs,
calibration (ECE), one-vs-rest ROC AUC and McNemar's exact test. No files, no models: numbers in, numbers out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class McNemarResult:
    b: int  # baseline right, challenger wrong
    c: int  # baseline wrong, challenger right
    p_exact: float  # two-sided exact binomial test on the discordant pairs
    p_midp: float  # mid-p variant (less conservative)
    chi2: float  # continuity-corrected statistic, for reference
    p_chi2: float


# --------------------------------------------------------------------------------------------- statistics


def mcnemar_test(b: int, c: int) -> McNemarResult:
    """McNemar's test on the discordant pairs ``b`` (only model A right) and ``c`` (only model B right).

    The exact p-value is the two-sided binomial test of b successes in b + c trials at 0.5; the mid-p value is
    the exact one minus the point probability of the observed split (Fagerland et al. 2013 recommend it for
    small counts: closer to nominal size than the conservative exact test). With no discordant pairs the
    models agree everywhere: p = 1.
    """
    from scipy import stats

    b, c = int(b), int(c)
    n = b + c
    if n == 0:
        return McNemarResult(b, c, 1.0, 1.0, 0.0, 1.0)
    p_exact = float(stats.binomtest(b, n, 0.5, alternative="two-sided").pvalue)
    k = min(b, c)
    p_mid = float(min(1.0, 2 * stats.binom.cdf(k, n, 0.5) - stats.binom.pmf(k, n, 0.5)))
    chi2 = (abs(b - c) - 1) ** 2 / n
    p_chi2 = float(stats.chi2.sf(chi2, df=1))
    return McNemarResult(b, c, min(1.0, p_exact), p_mid, float(chi2), p_chi2)


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` x ``n`` resampling indices (with replacement), seeded and independent of global state."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n), dtype=np.int64)


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples`` (NaNs, from resamples where the statistic is undefined,
    are ignored)."""
    s = np.asarray(samples, dtype=float)
    s = s[~np.isnan(s)]
    if s.size == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    lo, hi = np.quantile(s, [a, 1 - a])
    return (float(lo), float(hi))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """K x K counts, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def bootstrap_confusions(y_true: np.ndarray, y_pred: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """Confusion matrices of every resample: (n_boot, K, K), from the resampling indices ``idx``."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    n_boot = idx.shape[0]
    codes = y_true[idx] * k + y_pred[idx] + (np.arange(n_boot, dtype=np.int64) * k * k)[:, None]
    return np.bincount(codes.ravel(), minlength=n_boot * k * k).reshape(n_boot, k, k)


def metrics_from_confusion(cm: np.ndarray, present: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Accuracy, per-class precision/recall/F1 and macro averages from one (K x K) or many (B x K x K)
    confusion matrices.

    ``present`` (bool, K) selects the classes the macro averages run over (the classes present in the
    evaluated set). Recall of a class with no true items is NaN (undefined), precision of a class never
    predicted is 0 (as sklearn's ``zero_division=0`` and torchmetrics do), and F1 is 0 when precision and
    recall are both 0.
    """
    cm = np.asarray(cm, dtype=float)
    k = cm.shape[-1]
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)
    predicted = cm.sum(axis=-2)
    total = support.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1), 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
        f1 = np.where(np.isnan(recall), np.nan, f1)
        accuracy = np.where(total > 0, tp.sum(axis=-1) / np.where(total > 0, total, 1), np.nan)
        # one-vs-rest accuracy of each class, (TP + TN) / N, as training logs acc_<CLASS> (cxrlab.training.module)
        tot = np.where(total > 0, total, 1)[..., None]
        acc_ovr = (total[..., None] - (support - tp) - (predicted - tp)) / tot
    if present is None:
        present = np.ones(k, dtype=bool)
    sel = np.asarray(present, dtype=bool)
    with np.errstate(invalid="ignore"), _quiet_nanmean():
        prec_macro = np.nanmean(np.where(np.isnan(recall), np.nan, precision)[..., sel], axis=-1)
        rec_macro = np.nanmean(recall[..., sel], axis=-1)
        f1_macro = np.nanmean(f1[..., sel], axis=-1)
    return {
        "accuracy": accuracy,
        "acc_ovr": acc_ovr,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "precision_macro": prec_macro,
        "recall_macro": rec_macro,
        "f1_macro": f1_macro,
    }


class _quiet_nanmean:
    """Silence numpy's 'Mean of empty slice' (a resample where every present class vanished is NaN)."""

    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._w.__exit__(*exc)


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> tuple[float, pd.DataFrame]:
    """Top-label ECE with ``n_bins`` equal-width confidence bins (lo, hi], and the per-bin table behind the
    reliability diagram: ECE = sum_b (n_b / n) * |accuracy_b - confidence_b|."""
    probs = np.asarray(probs, dtype=float)
    y_true = np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == y_true).astype(float) if len(probs) else np.zeros(0)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    rows = []
    ece = 0.0
    n = len(conf)
    for b in range(n_bins):
        m = bins == b
        cnt = int(m.sum())
        acc = float(correct[m].mean()) if cnt else math.nan
        cf = float(conf[m].mean()) if cnt else math.nan
        if cnt:
            ece += cnt / n * abs(acc - cf)
        rows.append({"bin": b, "lo": edges[b], "hi": edges[b + 1], "count": cnt, "confidence": cf, "accuracy": acc})
    return (float(ece) if n else math.nan), pd.DataFrame(rows)


def paired_bootstrap_diff(
    correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int, seed: int, level: float = 0.95
) -> tuple[float, tuple[float, float]]:
    """Accuracy difference (b - a) on paired items and its percentile CI from resampling the items."""
    a = np.asarray(correct_a, dtype=float)
    b = np.asarray(correct_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired bootstrap needs the same items for both models")
    diff = float(b.mean() - a.mean()) if len(a) else math.nan
    if n_boot <= 0 or len(a) == 0:
        return diff, (math.nan, math.nan)
    idx = bootstrap_indices(len(a), n_boot, seed)
    return diff, percentile_ci(b[idx].mean(axis=1) - a[idx].mean(axis=1), level)


def _roc_auc(y_true: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """One-vs-rest ROC AUC per class; NaN where the class has no positives or no negatives."""
    from sklearn.metrics import roc_auc_score

    out = np.full(k, np.nan)
    for c in range(k):
        pos = y_true == c
        if 0 < pos.sum() < len(y_true):
            out[c] = roc_auc_score(pos, probs[:, c])
    return out


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    prefix: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Every metric of an evaluation from true labels (indices into ``classes``) and probabilities.

    Returns a dict with ``metrics`` (namespaced floats), ``ci`` (bootstrap percentile CIs of accuracy,
    macro precision/recall/F1 and per-class recall/precision), ``per_class`` (DataFrame), ``confusion``,
    ``ece``, ``reliability``, ``present`` / ``absent`` class names.
    """
    k = len(classes)
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=float)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, k)
    present = cm.sum(axis=1) > 0
    pm = metrics_from_confusion(cm, present)
    auc = _roc_auc(y_true, probs, k)
    ece, rel = expected_calibration_error(probs, y_true, n_bins)
    p_true = probs[np.arange(len(y_true)), y_true]
    nll = float(-np.mean(np.log(np.clip(p_true, 1e-12, 1.0))))
    onehot = np.eye(k)[y_true]
    brier = float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))

    m: dict[str, float] = {
        f"{prefix}/accuracy": float(pm["accuracy"]),
        f"{prefix}/precision_macro": float(pm["precision_macro"]),
        f"{prefix}/recall_macro": float(pm["recall_macro"]),
        f"{prefix}/f1_macro": float(pm["f1_macro"]),
        f"{prefix}/auc_macro": float(np.nanmean(auc)) if np.isfinite(auc).any() else math.nan,
        f"{prefix}/ece": ece,
        f"{prefix}/nll": nll,
        f"{prefix}/brier": brier,
    }
    for i, c in enumerate(classes):
        if not present[i]:
            continue  # per-class metrics of an absent class are undefined: reported as absent, not as 0
        m[f"{prefix}/precision_{c}"] = float(pm["precision"][i])
        m[f"{prefix}/recall_{c}"] = float(pm["recall"][i])
        m[f"{prefix}/acc_{c}"] = float(pm["acc_ovr"][i])  # one-vs-rest, as in training's metrics
        m[f"{prefix}/f1_{c}"] = float(pm["f1"][i])
        m[f"{prefix}/auc_{c}"] = float(auc[i])

    ci: dict[str, tuple[float, float]] = {}
    if n_boot > 0 and len(y_true):
        bm = metrics_from_confusion(
            bootstrap_confusions(y_true, y_pred, k, bootstrap_indices(len(y_true), n_boot, seed)), present
        )
        for name in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
            ci[f"{prefix}/{name}"] = percentile_ci(bm[name], level)
        for i, c in enumerate(classes):
            if present[i]:
                ci[f"{prefix}/recall_{c}"] = percentile_ci(bm["recall"][:, i], level)
                ci[f"{prefix}/acc_{c}"] = percentile_ci(bm["acc_ovr"][:, i], level)
                ci[f"{prefix}/precision_{c}"] = percentile_ci(bm["precision"][:, i], level)
                ci[f"{prefix}/f1_{c}"] = percentile_ci(bm["f1"][:, i], level)

    rows = []
    for i, c in enumerate(classes):
        fn = int(cm[i].sum() - cm[i, i])
        fp = int(cm[:, i].sum() - cm[i, i])
        row: dict[str, Any] = {
            "class": c,
            "present": bool(present[i]),
            "support": int(cm[i].sum()),
            "predicted": int(cm[:, i].sum()),
            "precision": float(pm["precision"][i]) if present[i] else math.nan,
            "recall": float(pm["recall"][i]),
            "f1": float(pm["f1"][i]),
            "auc": float(auc[i]),
            "fn": fn,  # 0 for an absent class (no true items to miss)
            "fp": fp,
        }
        for name in ("recall", "precision", "f1"):
            lo, hi = ci.get(f"{prefix}/{name}_{c}", (math.nan, math.nan))
            row[f"{name}_lo"], row[f"{name}_hi"] = lo, hi
        rows.append(row)
    return {
        "metrics": m,
        "ci": ci,
        "per_class": pd.DataFrame(rows),
        "confusion": cm,
        "ece": ece,
        "reliability": rel,
        "present": [c for i, c in enumerate(classes) if present[i]],
        "absent": [c for i, c in enumerate(classes) if not present[i]],
        "y_pred": y_pred,
    }


def per_source_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    sources: list[str],
    classes: list[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """One row per source: n, accuracy with its bootstrap CI, and for every class present there its count,
    recall with CI and how many of the source's images were predicted as it (a collapse shows as one class
    predicted for everything)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=float)
    src = np.asarray(sources, dtype=object)
    rows = []
    for s in sorted(set(src.tolist())):
        m = src == s
        r = compute_metrics(y_true[m], probs[m], classes, "s", n_boot, seed, level)
        lo, hi = r["ci"].get("s/accuracy", (math.nan, math.nan))
        row: dict[str, Any] = {
            "source": s,
            "n": int(m.sum()),
            "accuracy": r["metrics"]["s/accuracy"],
            "accuracy_lo": lo,
            "accuracy_hi": hi,
            "f1_macro": r["metrics"]["s/f1_macro"],
        }
        cm = r["confusion"]
        for i, c in enumerate(classes):
            row[f"n_{c}"] = int(cm[i].sum())
            row[f"predicted_{c}"] = int(cm[:, i].sum())
            row[f"recall_{c}"] = r["metrics"].get(f"s/recall_{c}", math.nan)
            row[f"recall_{c}_lo"], row[f"recall_{c}_hi"] = r["ci"].get(f"s/recall_{c}", (math.nan, math.nan))
        rows.append(row)
    return pd.DataFrame(rows)
