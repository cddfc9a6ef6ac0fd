"""The report's figures (matplotlib, Agg): confusion matrices, reliability diagram, ROC curves, training curves,
and the PNG files an evaluation or a comparison writes beside its page."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxrlab.data.classes import COSTLY_CLASS, costly_recall_key
from cxrlab.report import html as rh
from cxrlab.runs import (
    CONFUSION_PNG,
    RELIABILITY_PNG,
    ROC_PNG,
    read_metrics,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cxrlab.analysis.compare import CompareResult
    from cxrlab.analysis.evaluate import EvalResult


# --------------------------------------------------------------------------------------------- figures


DPI = 110


def _figure(w: float, h: float, ncols: int = 1, nrows: int = 1, **kw: Any) -> tuple[Figure, Any]:
    """A matplotlib Figure without pyplot (no global state, no GUI backend)."""
    return rh.new_figure(w, h, nrows=nrows, ncols=ncols, **kw)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def plot_confusion(ax: Any, cm: np.ndarray, classes: list[str], title: str = "") -> None:
    """Counts with row-normalised colour (share of each true class), annotated 'count\\n(xx%)'."""
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    k = len(classes)
    for i in range(k):
        for j in range(k):
            txt = f"{cm[i, j]}\n({share[i, j] * 100:.0f}%)" if rows[i, 0] else "–"
            ax.text(j, i, txt, ha="center", va="center", fontsize=9, color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), classes, rotation=30, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)


def confusion_figure(cm: np.ndarray, classes: list[str], title: str = "") -> Figure:
    k = len(classes)
    fig, ax = _figure(1.6 + 1.1 * k, 1.3 + 1.0 * k)
    plot_confusion(ax, cm, classes, title)
    return fig


def reliability_figure(rel: pd.DataFrame, ece: float) -> Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal, counts below."""
    fig, (ax, axh) = _figure(4.6, 4.6, nrows=2, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = float(rel["hi"].iloc[0] - rel["lo"].iloc[0]) if len(rel) else 1 / 15
    mid = (rel["lo"] + rel["hi"]) / 2
    has = rel["count"] > 0
    ax.plot([0, 1], [0, 1], "--", color="0.5", lw=1, label="perfect calibration")
    ax.bar(mid[has], rel["accuracy"][has], width=width * 0.95, color="#4c78a8", edgecolor="white", label="accuracy")
    gap_lo = np.minimum(rel["accuracy"], rel["confidence"])[has]
    gap_h = (rel["accuracy"] - rel["confidence"]).abs()[has]
    ax.bar(mid[has], gap_h, bottom=gap_lo, width=width * 0.95, color="#e45756", alpha=0.35, label="gap")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE = {ece:.3f}, {len(rel)} bins)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    axh.bar(mid, rel["count"], width=width * 0.95, color="0.6")
    axh.set_xlabel("confidence (top-class probability)")
    axh.set_ylabel("images")
    return fig


def roc_figure(pred: pd.DataFrame, classes: list[str]) -> Figure | None:
    """One-vs-rest ROC curves of the classes with positives and negatives in ``pred``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = _figure(4.4, 4.0)
    drawn = 0
    for c in classes:
        col = f"p_{c}"
        if col not in pred.columns:
            continue
        pos = (pred["label"] == c).to_numpy()
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, pred[col].to_numpy())
        ax.plot(fpr, tpr, lw=1.5, label=f"{c} (AUC {roc_auc_score(pos, pred[col]):.3f})")
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], ":", color="0.5", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (recall)")
    ax.set_title("one-vs-rest ROC", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def training_curves_figure(
    metrics_csv: Path, best_epoch: int | None = None, costly: str = COSTLY_CLASS
) -> Figure | None:
    """Loss and validation scores per epoch from a run's ``metrics.csv`` (with the recall of the ``costly`` class)."""
    rows = read_metrics(metrics_csv)
    if not rows:
        return None
    df = pd.DataFrame(rows)
    loss_cols = [c for c in df.columns if c.endswith("/loss")]
    score_cols = [
        c
        for c in (
            "val/f1_macro",
            "val/accuracy",
            "train/f1_macro",
            "train/accuracy",
            costly_recall_key(df.columns, "val/", costly),
        )
        if c is not None and c in df.columns
    ]
    if not loss_cols and not score_cols:
        return None
    fig, (a1, a2) = _figure(8.4, 3.4, ncols=2)
    x = df["epoch"].to_numpy()
    for c in loss_cols:
        s = df[c]
        a1.plot(x[s.notna()], s.dropna(), marker="o", ms=3, label=c)
    a1.set_title("loss", fontsize=10)
    a1.set_xlabel("epoch")
    for c in score_cols:
        s = df[c]
        a2.plot(x[s.notna()], s.dropna(), marker="o", ms=3, label=c, ls="--" if c.startswith("train/") else "-")
    a2.set_title("scores", fontsize=10)
    a2.set_xlabel("epoch")
    a2.set_ylim(max(0.0, min(0.5, a2.get_ylim()[0])), 1.01)
    from matplotlib.ticker import MaxNLocator

    for a in (a1, a2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlim(x.min() - 0.5, x.max() + 0.5)
        if best_epoch is not None:
            a.axvline(best_epoch, color="0.6", ls=":", lw=1, label=f"best epoch {best_epoch}")
        if a.lines:
            a.legend(fontsize=7)
    return fig


def write_eval_figures(result: EvalResult, out: Path) -> dict[str, Path]:
    """confusion_matrix.png, reliability.png and roc.png of an evaluation."""
    out = Path(out)
    paths = {
        "confusion_png": _save(confusion_figure(result.confusion, result.classes), out / CONFUSION_PNG),
        "reliability_png": _save(reliability_figure(result.reliability, result.ece), out / RELIABILITY_PNG),
    }
    fig = roc_figure(result.predictions, result.classes)
    if fig is not None:
        paths["roc_png"] = _save(fig, out / ROC_PNG)
    return paths


def write_compare_confusion(result: CompareResult, path: Path) -> Path:
    classes = result.baseline.classes
    k = len(classes)
    fig, (a, b) = _figure(2 * (1.6 + 1.1 * k), 1.3 + 1.0 * k, ncols=2)
    plot_confusion(a, result.baseline.confusion, classes, "baseline")
    plot_confusion(b, result.challenger.confusion, classes, "challenger")
    return _save(fig, Path(path))
