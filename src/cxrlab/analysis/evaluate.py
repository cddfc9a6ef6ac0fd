"""Evaluation of a trained model and baseline-vs-challenger comparison.

``evaluate(EvalConfig) -> EvalResult`` runs a bundle (or a run directory's bundle) on the run's own test/val
split or on any folder-of-classes / manifest, and writes::

    <out>/metrics.json           every metric, its 95% bootstrap CI, per-class table, calibration bins
    <out>/predictions.csv        path, label, prediction, correct, p_<CLASS> for every class
    <out>/confusion_matrix.csv   rows = true class, columns = predicted class
    <out>/confusion_matrix.png
    <out>/reliability.png        reliability diagram (15 equal-width confidence bins)
    <out>/roc.png                one-vs-rest ROC curves
    <out>/report.html            self-contained page with all of the above

``compare(CompareConfig) -> CompareResult`` evaluates two models on the same items and judges the difference
with McNemar's exact test on paired correctness and a paired bootstrap CI of the accuracy difference.

Statistics are honest about small test sets: every headline number carries a seeded percentile bootstrap CI,
and a comparison verdict says "no significant difference" unless the paired test says otherwise.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from cxrlab.atomic import json_safe, write_json
from cxrlab.config import StrictModel
from cxrlab.data.classes import norm_class_name, order_costly_first
from cxrlab.data.manifest import SPLIT_FILE, SPLIT_META_FILE, DataError, load_split, read_manifest
from cxrlab.errors import CxrlabError
from cxrlab.inference.infer import resolve_device
from cxrlab.runs import (
    CONFUSION_CSV,
    EVAL_METRICS_FILE,
    PREDICTIONS_FILE,
    REPORT_FILE,
    SKIPPED_FILE,
    find_run_dir,
    read_run_config,
    read_summary,
    stage_dir,
)
from cxrlab.tracking import resumed_run, tracked_run_info

log = logging.getLogger(__name__)


class EvalError(CxrlabError):
    """Evaluation cannot proceed; the message says which input is wrong and what to do."""


# --------------------------------------------------------------------------------------------- configs


class EvalConfig(StrictModel):
    """What to evaluate, on which data, and where the results go."""

    target: Path = Field(description="run directory or bundle directory")
    split: Literal["test", "val"] = Field("test", description="split of the run's own data (or of --data's split)")
    data: Path | None = Field(None, description="external data: folder of class folders, manifest or split csv")
    out: Path | None = Field(None, description="output directory; default <run>/eval-<split> or eval-<data name>")
    batch_size: int = Field(32, ge=1)
    seed: int = Field(0, description="seed of the bootstrap resampling")
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples for the CIs; 0 = no CIs")
    ci_level: float = Field(0.95, gt=0, lt=1)
    n_bins: int = Field(15, ge=1, description="confidence bins of the expected calibration error")
    device: str = Field("auto", description="auto = cuda when available, else cpu")
    wandb: Literal["auto", "off"] = Field("auto", description="auto = log to the run's W&B run when it has one")
    progress: bool = True
    report: bool = Field(True, description="write report.html and the PNG figures")


class CompareConfig(StrictModel):
    """Two models (run or bundle directories) evaluated on the same items."""

    baseline: Path
    challenger: Path
    split: Literal["test", "val"] = "test"
    data: Path | None = None
    out: Path | None = Field(None, description="output directory; default ./compare-<baseline>-vs-<challenger>")
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    n_boot: int = Field(1000, ge=0)
    ci_level: float = Field(0.95, gt=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the verdict")
    n_bins: int = Field(15, ge=1)
    device: str = "auto"
    progress: bool = True
    report: bool = True


# --------------------------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    out_dir: Path
    bundle_dir: Path
    run_dir: Path | None
    prefix: str  # metric namespace: "test", "val" or "ext"
    data_source: str
    dataset_version: str
    classes: list[str]
    present_classes: list[str]
    absent_classes: list[str]
    n: int
    # namespaced: test/accuracy, test/f1_macro, test/recall_COVID19 (the seed's "individual accuracy" of COVID-19),
    # test/acc_COVID19 (one-vs-rest (TP+TN)/N, the same quantity training logs under that name), test/ece ...
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]  # same keys as metrics, for the bootstrapped ones
    per_class: pd.DataFrame  # class, support, precision, recall (the seed's per-class accuracy), f1, auc, fn, fp, CIs
    confusion: np.ndarray  # K x K counts, rows = true, columns = predicted (bundle class order)
    ece: float
    reliability: pd.DataFrame  # bin, lo, hi, count, confidence, accuracy
    skipped: list[dict[str, str]]  # path, reason of unreadable files
    paths: dict[str, Path]  # written files by name
    predictions: pd.DataFrame  # path, label, prediction, correct, p_<CLASS>...
    probs: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))
    wandb_logged: bool = False

    @property
    def y_true(self) -> np.ndarray:
        return self.predictions["label"].map({c: i for i, c in enumerate(self.classes)}).to_numpy()

    @property
    def y_pred(self) -> np.ndarray:
        return self.predictions["prediction"].map({c: i for i, c in enumerate(self.classes)}).to_numpy()


@dataclass(frozen=True)
class McNemarResult:
    b: int  # baseline right, challenger wrong
    c: int  # baseline wrong, challenger right
    p_exact: float  # two-sided exact binomial test on the discordant pairs
    p_midp: float  # mid-p variant (less conservative)
    chi2: float  # continuity-corrected statistic, for reference
    p_chi2: float


@dataclass
class CompareResult:
    out_dir: Path
    baseline: EvalResult
    challenger: EvalResult
    n: int
    mcnemar: McNemarResult
    accuracy_diff: float  # challenger - baseline
    accuracy_diff_ci: tuple[float, float]
    f1_diff: float
    f1_diff_ci: tuple[float, float]
    both_right: int
    both_wrong: int
    errors: pd.DataFrame  # class, fn_baseline, fn_challenger, fp_baseline, fp_challenger (costly class first)
    significant: bool
    verdict: str
    attention: pd.DataFrame | None
    paths: dict[str, Path]


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


# --------------------------------------------------------------------------------------------- items


@dataclass
class Items:
    """The images to evaluate: absolute paths and class names (already mapped onto the bundle's)."""

    paths: list[str]
    labels: list[str]
    source: str  # human-readable description of where the items came from
    dataset_version: str
    kind: Literal["split", "external"]


def map_class_names(names: list[str] | set[str], classes: list[str], where: str) -> dict[str, str]:
    """Map data class names onto the bundle's: exact, else case/punctuation-insensitive (``covid-19`` ->
    ``COVID19``). Unknown names raise EvalError listing the bundle's classes."""
    by_norm = {norm_class_name(c): c for c in classes}
    out, unknown = {}, []
    for n in sorted(set(names)):
        if n in classes:
            out[n] = n
        elif norm_class_name(n) in by_norm:
            out[n] = by_norm[norm_class_name(n)]
        else:
            unknown.append(n)
    if unknown:
        raise EvalError(
            f"{where}: class names {unknown} are not classes of the model ({', '.join(classes)}); "
            "rename them or evaluate a model trained on these classes"
        )
    return out


def _list_class_folders(root: Path, classes: list[str]) -> tuple[list[str], list[str]]:
    from cxrlab.data.io import IMAGE_EXTENSIONS

    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise EvalError(f"{root} has no class folders; pass a folder with one sub-folder per class or a manifest csv")
    split_like = {d.name.lower() for d in subdirs} & {"train", "val", "test"}
    if split_like and not ({norm_class_name(d.name) for d in subdirs} & {norm_class_name(c) for c in classes}):
        raise EvalError(
            f"{root} looks like a train/test layout ({', '.join(sorted(split_like))}); pass one of its class-folder "
            f"parents, e.g. {root / sorted(split_like)[0]}"
        )
    mapping = map_class_names([d.name for d in subdirs], classes, str(root))
    paths, labels = [], []
    for d in subdirs:
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += [str(p.resolve()) for p in files]
        labels += [mapping[d.name]] * len(files)
    return paths, labels


def _table_items(df: pd.DataFrame, base: Path, split: str, classes: list[str], where: str) -> tuple[list, list, str]:
    if "path" not in df.columns or "label" not in df.columns:
        raise EvalError(f"{where} needs 'path' and 'label' columns (a cxrlab manifest or split csv)")
    what = "all rows"
    if "split" in df.columns:
        sub = df[df["split"] == split]
        if sub.empty:
            have = sorted(df["split"].astype(str).unique())
            raise EvalError(f"{where} has no '{split}' rows (splits present: {', '.join(have)}); use --split")
        df, what = sub, f"split '{split}'"
    mapping = map_class_names(set(df["label"].astype(str)), classes, where)
    paths = [str(p if Path(p).is_absolute() else (base / p).resolve()) for p in df["path"].astype(str)]
    return paths, [mapping[str(v)] for v in df["label"]], what


def _split_dataset_version(d: Path) -> str:
    meta = d / SPLIT_META_FILE
    if meta.is_file():
        try:
            return str(json.loads(meta.read_text()).get("dataset_version") or "unversioned")
        except json.JSONDecodeError:
            return "unversioned"
    return "unversioned"


def resolve_external_items(data: Path, split: str, classes: list[str]) -> Items:
    """Items from ``--data``: a folder of class folders, a split/manifest directory, or a csv."""
    data = Path(data)
    if not data.exists():
        raise EvalError(f"--data {data} does not exist; pass a folder of class folders or a manifest/split csv")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise EvalError(f"--data {data} is a file but not a csv; pass a folder of class folders or a csv")
        df = pd.read_csv(data, keep_default_na=False)
        paths, labels, what = _table_items(df, data.parent, split, classes, str(data))
        return Items(paths, labels, f"{data} ({what})", _split_dataset_version(data.parent), "external")
    if (data / SPLIT_FILE).is_file():
        info = load_split(data)
        paths, labels, what = _table_items(info.table, data, split, classes, str(data / SPLIT_FILE))
        return Items(paths, labels, f"{data} ({what})", info.dataset_version, "external")
    if (data / "manifest.csv").is_file():
        df = read_manifest(data)
        paths, labels, what = _table_items(df, data, split, classes, str(data / "manifest.csv"))
        return Items(paths, labels, f"{data} ({what})", "unversioned", "external")
    paths, labels = _list_class_folders(data, classes)
    return Items(paths, labels, f"{data} (class folders)", "unversioned", "external")


def _run_split_dir(run_dir: Path | None, summary: dict[str, Any], bundle_config: dict[str, Any]) -> Path | None:
    cands: list[str] = []
    if summary.get("data"):
        cands.append(str(summary["data"]))
    cfg = read_run_config(run_dir)
    if cfg.get("data"):
        cands.append(str(cfg["data"]))
    if bundle_config.get("data"):
        cands.append(str(bundle_config["data"]))
    for c in cands:
        p = Path(c)
        for q in (p, (run_dir / p) if run_dir is not None and not p.is_absolute() else None):
            if q is not None and ((q.is_dir() and (q / SPLIT_FILE).is_file()) or q.is_file()):
                return q
    if cands:
        raise EvalError(
            f"the split used for training ({cands[0]}) no longer exists; pass --data FOLDER_OR_MANIFEST "
            "to evaluate on other data"
        )
    return None


def resolve_items(
    target: Path, split: str, data: Path | None, classes: list[str], bundle_config: dict[str, Any]
) -> Items:
    """The items of an evaluation: ``data`` when given, else the run's own ``split``."""
    if data is not None:
        return resolve_external_items(data, split, classes)
    run_dir = find_run_dir(target)
    split_dir = _run_split_dir(run_dir, read_summary(run_dir), bundle_config)
    if split_dir is None:
        raise EvalError(
            f"{target} does not record the split it was trained on; pass --data FOLDER_OR_MANIFEST "
            "(a folder of class folders, a manifest or a split csv)"
        )
    info = load_split(split_dir)
    sub = info.subset(split)
    if sub.empty:
        raise EvalError(f"split {info.root} has no '{split}' images; use --split val|test or --data")
    mapping = map_class_names(set(sub["label"].astype(str)), classes, str(info.root / SPLIT_FILE))
    paths = [str(p if Path(p).is_absolute() else (info.root / p).resolve()) for p in sub["path"].astype(str)]
    labels = [mapping[str(v)] for v in sub["label"]]
    return Items(paths, labels, f"{info.root} (split '{split}')", info.dataset_version, "split")


# --------------------------------------------------------------------------------------------- prediction


def predict_items(
    bundle: Any, paths: list[str], batch_size: int = 32, progress: bool = True, desc: str = "predict"
) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
    """Probabilities for every readable path. Returns (probs for the kept items, kept indices, skipped
    [{path, reason}]). Unreadable files are reported and skipped; the rest goes on."""
    from tqdm.auto import tqdm

    from cxrlab.data.io import ImageReadError, read_xray

    probs: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[dict[str, str]] = []
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, len(paths), batch_size):
            grays, idx = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    grays.append(read_xray(paths[i]))
                    idx.append(i)
                except ImageReadError as e:
                    skipped.append({"path": paths[i], "reason": str(getattr(e, "reason", e))})
                except FileNotFoundError:
                    skipped.append({"path": paths[i], "reason": "file not found"})
            if grays:
                probs.append(bundle.predict_proba(grays, batch_size=batch_size))
                kept += idx
            bar.update(min(batch_size, len(paths) - start))
    finally:
        bar.close()
    k = bundle.meta.num_classes
    return (np.concatenate(probs) if probs else np.zeros((0, k))), kept, skipped


# --------------------------------------------------------------------------------------------- evaluate


def _default_out(cfg: EvalConfig, bundle_dir: Path, run_dir: Path | None) -> Path:
    return stage_dir(run_dir if run_dir is not None else bundle_dir, "eval", cfg.split, cfg.data)


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Evaluate ``cfg.target`` on its own split or on ``cfg.data``; write metrics, predictions, figures and
    report.html; log to the run's W&B run when it has one."""
    from cxrlab.inference.bundle import load_bundle, resolve_bundle_dir

    bundle_dir = resolve_bundle_dir(cfg.target)
    run_dir = find_run_dir(bundle_dir)
    bundle = load_bundle(bundle_dir, device=resolve_device(cfg.device, EvalError))
    classes = list(bundle.meta.class_names)
    items = resolve_items(run_dir or bundle_dir, cfg.split, cfg.data, classes, bundle.meta.config or {})
    if not items.paths:
        raise EvalError(f"no images found in {items.source}")
    prefix = cfg.split if cfg.data is None else "ext"
    probs, kept, skipped = predict_items(
        bundle, items.paths, cfg.batch_size, cfg.progress, desc=f"evaluate {prefix} ({len(items.paths)} images)"
    )
    for s in skipped:
        log.warning("skipped %s: %s", s["path"], s["reason"])
    if not kept:
        raise EvalError(
            f"none of the {len(items.paths)} images in {items.source} could be read (see the reasons above)"
        )
    cidx = {c: i for i, c in enumerate(classes)}
    y_true = np.array([cidx[items.labels[i]] for i in kept])
    res = compute_metrics(y_true, probs, classes, prefix, cfg.n_boot, cfg.seed, cfg.ci_level, cfg.n_bins)

    out = Path(cfg.out) if cfg.out else _default_out(cfg, bundle_dir, run_dir)
    out.mkdir(parents=True, exist_ok=True)
    preds = pd.DataFrame(
        {
            "path": [items.paths[i] for i in kept],
            "label": [items.labels[i] for i in kept],
            "prediction": [classes[j] for j in res["y_pred"]],
        }
    )
    preds["correct"] = preds["label"] == preds["prediction"]
    preds["confidence"] = probs.max(axis=1)
    for j, c in enumerate(classes):
        preds[f"p_{c}"] = probs[:, j]

    summary = read_summary(run_dir)
    result = EvalResult(
        out_dir=out,
        bundle_dir=bundle_dir,
        run_dir=run_dir,
        prefix=prefix,
        data_source=items.source,
        dataset_version=items.dataset_version,
        classes=classes,
        present_classes=res["present"],
        absent_classes=res["absent"],
        n=len(kept),
        metrics=res["metrics"],
        ci=res["ci"],
        per_class=res["per_class"],
        confusion=res["confusion"],
        ece=res["ece"],
        reliability=res["reliability"],
        skipped=skipped,
        paths={},
        predictions=preds,
        probs=probs,
    )
    paths = result.paths
    paths["predictions"] = out / PREDICTIONS_FILE
    preds.to_csv(paths["predictions"], index=False, float_format="%.6g")
    paths["confusion_csv"] = out / CONFUSION_CSV
    pd.DataFrame(result.confusion, index=pd.Index(classes, name="true"), columns=classes).to_csv(paths["confusion_csv"])
    if skipped:
        paths["skipped"] = out / SKIPPED_FILE
        pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(paths["skipped"], index=False)
    if cfg.report:
        from cxrlab.report import pages as report

        paths.update(report.write_eval_figures(result, out))
    paths["metrics"] = out / EVAL_METRICS_FILE
    if cfg.report:
        paths["report"] = out / REPORT_FILE
    _write_metrics_json(result, cfg, summary, paths["metrics"])
    if cfg.report:
        from cxrlab.report import pages as report

        report.write_eval_report(out, paths["report"])
    if cfg.wandb == "auto" and run_dir is not None:
        result.wandb_logged = log_to_wandb(result, run_dir, summary)
    return result


def _write_metrics_json(result: EvalResult, cfg: EvalConfig | None, summary: dict[str, Any], path: Path) -> None:
    doc = {
        "target": str(cfg.target) if cfg else None,
        "bundle": str(result.bundle_dir),
        "run_dir": str(result.run_dir) if result.run_dir else None,
        "run_id": summary.get("run_id"),
        "prefix": result.prefix,
        "split": cfg.split if cfg else None,
        "data": result.data_source,
        "dataset_version": result.dataset_version,
        "n": result.n,
        "n_skipped": len(result.skipped),
        "classes": result.classes,
        "present_classes": result.present_classes,
        "absent_classes": result.absent_classes,
        "macro_over": result.present_classes,
        "metrics": result.metrics,
        "ci": {k: list(v) for k, v in result.ci.items()},
        "ci_method": f"percentile bootstrap, {cfg.n_boot if cfg else 0} resamples, seed {cfg.seed if cfg else 0}",
        "ci_level": cfg.ci_level if cfg else 0.95,
        "per_class": result.per_class.to_dict(orient="records"),
        "confusion_matrix": result.confusion,
        "ece": result.ece,
        "ece_bins": len(result.reliability),
        "reliability": result.reliability.to_dict(orient="records"),
        "skipped": result.skipped,
        "files": {k: v.name for k, v in result.paths.items()},
    }
    write_json(path, json_safe(doc))


# --------------------------------------------------------------------------------------------- W&B


def log_to_wandb(result: EvalResult, run_dir: Path, summary: dict[str, Any]) -> bool:
    """Resume the run's W&B run (same id, same mode) and add the evaluation: summary metrics with their CIs,
    the confusion matrix and the predictions table. Optional and robust: a failure is a warning, never an
    error (the local files are the record)."""
    info = tracked_run_info(run_dir, summary)
    if info is None:
        return False
    try:
        import wandb

        with resumed_run(run_dir, info, "evaluate") as run:
            summ = {k: v for k, v in result.metrics.items() if math.isfinite(v)}
            for k, (lo, hi) in result.ci.items():
                if math.isfinite(lo) and math.isfinite(hi):
                    summ[f"{k}_ci_low"], summ[f"{k}_ci_high"] = lo, hi
            run.summary.update(summ)
            p = result.prefix
            preds = result.predictions.assign(correct=result.predictions["correct"].astype(int))
            run.log(
                {
                    f"{p}/confusion_matrix": wandb.plot.confusion_matrix(
                        y_true=result.y_true.tolist(), preds=result.y_pred.tolist(), class_names=result.classes
                    ),
                    f"{p}/predictions": wandb.Table(dataframe=preds),
                }
            )
        return True
    except Exception as e:  # tracking must never break an evaluation
        log.warning("could not log the evaluation to W&B run %s: %s", info["id"], e)
        return False


# --------------------------------------------------------------------------------------------- compare


def _fmt_pt(x: float) -> str:
    return f"{x * 100:+.1f}"


def make_verdict(
    n: int, mc: McNemarResult, diff: float, ci: tuple[float, float], alpha: float = 0.05, level: float = 0.95
) -> tuple[bool, str]:
    """Plain-language verdict from McNemar's exact p-value (significant when p < ``alpha``) and the accuracy
    difference (challenger - baseline) with its ``level`` bootstrap CI."""
    ci_txt = f", {100 * level:.0f}% CI [{_fmt_pt(ci[0])}, {_fmt_pt(ci[1])}]" if all(map(math.isfinite, ci)) else ""
    tail = (
        f"McNemar exact p={mc.p_exact:.3g} ({mc.b} vs {mc.c} discordant); "
        f"accuracy difference {_fmt_pt(diff)} pt{ci_txt}"
    )
    if mc.p_exact < alpha:
        better = "challenger" if mc.c > mc.b else "baseline"
        return True, f"significant difference at n={n}: the {better} is more accurate; {tail}"
    return False, f"no significant difference at n={n}: {tail}"


ATTENTION_KEYS = ("in_lungs", "on_text", "on_border", "on_text_where_text", "with_text", "n_images")


def _read_attention(run_dir: Path | None, split: str) -> dict[str, float] | None:
    """Mean attention shares of a run's explanation (``explain-*/attention.json``, written by cxrlab.analysis.explain).

    Prefers an explanation of every image (not errors only) on the compared split, then the newest."""
    if run_dir is None:
        return None
    docs = []
    for f in run_dir.glob("explain*/attention.json"):
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("summary"), dict):
            rank = (doc.get("subset", "all") == "all", doc.get("split") == split, f.stat().st_mtime)
            docs.append((rank, doc))
    if not docs:
        return None
    summary = max(docs, key=lambda x: x[0])[1]["summary"]
    out = {k: float(summary[k]) for k in ATTENTION_KEYS if isinstance(summary.get(k), int | float)}
    return out or None


def compare(cfg: CompareConfig) -> CompareResult:
    """Evaluate baseline and challenger on the same items and judge the difference.

    Both are evaluated with ``evaluate`` (full artefacts under ``<out>/baseline`` and ``<out>/challenger``);
    the comparison pairs predictions by path. Without ``--data`` their own splits must hold the same items.
    """
    from cxrlab.inference.bundle import load_bundle, resolve_bundle_dir

    metas = []
    for name, t in (("baseline", cfg.baseline), ("challenger", cfg.challenger)):
        try:
            metas.append(load_bundle(resolve_bundle_dir(t)).meta)
        except CxrlabError as e:
            raise EvalError(f"{name}: {e}") from e
    if sorted(metas[0].class_names) != sorted(metas[1].class_names):
        raise EvalError(
            f"baseline classes {metas[0].class_names} differ from challenger classes {metas[1].class_names}; "
            "models are only comparable on the same classes"
        )
    if cfg.data is None:
        items = []
        for t, m in ((cfg.baseline, metas[0]), (cfg.challenger, metas[1])):
            rd = find_run_dir(resolve_bundle_dir(t)) or find_run_dir(Path(t))
            items.append(resolve_items(rd or resolve_bundle_dir(t), cfg.split, None, m.class_names, m.config or {}))
        a, b = set(items[0].paths), set(items[1].paths)
        if a != b:
            raise EvalError(
                f"baseline and challenger were trained on different splits ({len(a ^ b)} of {len(a | b)} "
                f"'{cfg.split}' items differ: {items[0].source} vs {items[1].source}); pass --data to compare them "
                "on one set"
            )
    out = Path(cfg.out) if cfg.out else Path(f"compare-{Path(cfg.baseline).name}-vs-{Path(cfg.challenger).name}")
    out.mkdir(parents=True, exist_ok=True)
    common = {
        "split": cfg.split,
        "data": cfg.data,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "n_boot": cfg.n_boot,
        "ci_level": cfg.ci_level,
        "n_bins": cfg.n_bins,
        "device": cfg.device,
        "progress": cfg.progress,
        "report": cfg.report,
        "wandb": "off",
    }
    base = evaluate(EvalConfig(target=cfg.baseline, out=out / "baseline", **common))
    chal = evaluate(EvalConfig(target=cfg.challenger, out=out / "challenger", **common))

    # pair by path: a file unreadable for one is unreadable for both, but be exact about it
    pa = base.predictions.set_index("path")
    pc = chal.predictions.set_index("path")
    keys = [p for p in pa.index if p in pc.index]
    if not keys:
        raise EvalError("baseline and challenger share no evaluated items")
    ca = pa.loc[keys, "correct"].to_numpy(bool)
    cc = pc.loc[keys, "correct"].to_numpy(bool)
    n = len(keys)
    mc = mcnemar_test(int(np.sum(ca & ~cc)), int(np.sum(~ca & cc)))
    diff, diff_ci = paired_bootstrap_diff(ca, cc, cfg.n_boot, cfg.seed, cfg.ci_level)

    # paired macro-F1 difference on the same resamples
    classes = base.classes
    cidx = {c: i for i, c in enumerate(classes)}
    yt = pa.loc[keys, "label"].map(cidx).to_numpy()
    ya = pa.loc[keys, "prediction"].map(cidx).to_numpy()
    yc = pc.loc[keys, "prediction"].map(cidx).to_numpy()
    k = len(classes)
    present = confusion_matrix(yt, yt, k).sum(axis=1) > 0
    f1a = float(metrics_from_confusion(confusion_matrix(yt, ya, k), present)["f1_macro"])
    f1c = float(metrics_from_confusion(confusion_matrix(yt, yc, k), present)["f1_macro"])
    f1_ci: tuple[float, float] = (math.nan, math.nan)
    if cfg.n_boot > 0:
        idx = bootstrap_indices(n, cfg.n_boot, cfg.seed)
        fa = metrics_from_confusion(bootstrap_confusions(yt, ya, k, idx), present)["f1_macro"]
        fc = metrics_from_confusion(bootstrap_confusions(yt, yc, k, idx), present)["f1_macro"]
        f1_ci = percentile_ci(fc - fa, cfg.ci_level)

    cma, cmc = confusion_matrix(yt, ya, k), confusion_matrix(yt, yc, k)
    rows = []
    for c in order_costly_first(classes):
        i = cidx[c]
        rows.append(
            {
                "class": c,
                "support": int(cma[i].sum()),
                "fn_baseline": int(cma[i].sum() - cma[i, i]),
                "fn_challenger": int(cmc[i].sum() - cmc[i, i]),
                "fp_baseline": int(cma[:, i].sum() - cma[i, i]),
                "fp_challenger": int(cmc[:, i].sum() - cmc[i, i]),
            }
        )
    errors = pd.DataFrame(rows)
    significant, verdict = make_verdict(n, mc, diff, diff_ci, cfg.alpha, cfg.ci_level)

    att_a, att_c = _read_attention(base.run_dir, cfg.split), _read_attention(chal.run_dir, cfg.split)
    attention = None
    if att_a and att_c:
        keys_att = [k_ for k_ in att_a if k_ in att_c]
        if keys_att:

            def col(att: dict[str, float]) -> list[Any]:  # counts stay integers in the table
                return [int(att[x]) if x == "n_images" else att[x] for x in keys_att]

            attention = pd.DataFrame(
                {"score": keys_att, "baseline": col(att_a), "challenger": col(att_c)}, dtype=object
            )

    result = CompareResult(
        out_dir=out,
        baseline=base,
        challenger=chal,
        n=n,
        mcnemar=mc,
        accuracy_diff=diff,
        accuracy_diff_ci=diff_ci,
        f1_diff=f1c - f1a,
        f1_diff_ci=f1_ci,
        both_right=int(np.sum(ca & cc)),
        both_wrong=int(np.sum(~ca & ~cc)),
        errors=errors,
        significant=significant,
        verdict=verdict,
        attention=attention,
        paths={},
    )
    if cfg.report:
        from cxrlab.report import pages as report

        result.paths["confusion_png"] = report.write_compare_confusion(result, out / "confusion_matrices.png")
    result.paths["json"] = out / "compare.json"
    _write_compare_json(result, cfg)
    if cfg.report:
        from cxrlab.report import pages as report

        result.paths["report"] = report.write_compare_report(result, out / "compare.html")
    return result


def _write_compare_json(r: CompareResult, cfg: CompareConfig) -> None:
    p = r.baseline.prefix
    headline = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_macro", "ece"]
    side = {}
    for name, e in (("baseline", r.baseline), ("challenger", r.challenger)):
        side[name] = {
            "target": str(cfg.baseline if name == "baseline" else cfg.challenger),
            "bundle": str(e.bundle_dir),
            "n": e.n,
            "metrics": {k: e.metrics.get(f"{p}/{k}") for k in headline}
            | {k.split("/", 1)[1]: v for k, v in e.metrics.items() if "/recall_" in k},
            "ci": {k.split("/", 1)[1]: list(v) for k, v in e.ci.items()},
            "confusion_matrix": e.confusion,
        }
    doc = {
        "n": r.n,
        "classes": r.baseline.classes,
        "data": r.baseline.data_source,
        "baseline": side["baseline"],
        "challenger": side["challenger"],
        "both_right": r.both_right,
        "both_wrong": r.both_wrong,
        "mcnemar": {
            "b_baseline_only_correct": r.mcnemar.b,
            "c_challenger_only_correct": r.mcnemar.c,
            "p_exact": r.mcnemar.p_exact,
            "p_midp": r.mcnemar.p_midp,
            "chi2_cc": r.mcnemar.chi2,
            "p_chi2_cc": r.mcnemar.p_chi2,
        },
        "accuracy_diff": r.accuracy_diff,
        "accuracy_diff_ci": list(r.accuracy_diff_ci),
        "f1_macro_diff": r.f1_diff,
        "f1_macro_diff_ci": list(r.f1_diff_ci),
        "ci_method": f"paired percentile bootstrap, {cfg.n_boot} resamples, seed {cfg.seed}",
        "alpha": cfg.alpha,
        "significant": r.significant,
        "verdict": r.verdict,
        "errors": r.errors.to_dict(orient="records"),
        "attention": r.attention.to_dict(orient="records") if r.attention is not None else None,
    }
    write_json(r.paths["json"], json_safe(doc))


__all__ = [
    "CompareConfig",
    "CompareResult",
    "DataError",
    "EvalConfig",
    "EvalError",
    "EvalResult",
    "McNemarResult",
    "bootstrap_confusions",
    "bootstrap_indices",
    "compare",
    "compute_metrics",
    "confusion_matrix",
    "evaluate",
    "expected_calibration_error",
    "make_verdict",
    "mcnemar_test",
    "metrics_from_confusion",
    "paired_bootstrap_diff",
    "percentile_ci",
]
