"""Evaluation of a trained model on its own split or on other data.

``evaluate(EvalConfig) -> EvalResult`` runs a bundle (or a run directory's bundle) on the run's own test/val
split or on any folder-of-classes / manifest, and writes::

    <out>/metrics.json           every metric, its 95% bootstrap CI, per-class table, calibration bins
    <out>/predictions.csv        path, label, prediction, correct, p_<CLASS> for every class
    <out>/confusion_matrix.csv   rows = true class, columns = predicted class
    <out>/confusion_matrix.png
    <out>/reliability.png        reliability diagram (15 equal-width confidence bins)
    <out>/roc.png                one-vs-rest ROC curves
    <out>/report.html            self-contained page with all of the above
    <out>/per_source.csv         n, accuracy and per-class recall (with CIs) per source, when the data has sources

Shift checks (:mod:`cxrlab.analysis.shift`) on every evaluation: the collapse test (predicted vs true class
counts); and, for a bundle with shift statistics, the label-shift test (black-box shift estimation) and a
per-image out-of-distribution flag (``ood``, ``ood_score``, ``ood_reasons`` columns of predictions.csv,
:mod:`cxrlab.analysis.ood`). What fires is in ``warnings`` of metrics.json, on the console and at the top of
report.html.

Statistics are honest about small test sets: every headline number carries a seeded percentile bootstrap CI
(``cxrlab.analysis.metrics``). What to evaluate is resolved by ``cxrlab.data.items``; baseline vs challenger is
``cxrlab.analysis.compare``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlab.analysis.configs import EvalConfig
from cxrlab.analysis.metrics import compute_metrics, per_source_metrics
from cxrlab.analysis.shift import shift_checks
from cxrlab.atomic import json_safe, write_json
from cxrlab.data.classes import COSTLY_CLASS, resolve_costly_class
from cxrlab.data.items import resolve_items
from cxrlab.errors import EvalError
from cxrlab.inference.infer import resolve_device
from cxrlab.runs import (
    CONFUSION_CSV,
    EVAL_METRICS_FILE,
    PER_SOURCE_FILE,
    PREDICTIONS_FILE,
    REPORT_FILE,
    SKIPPED_FILE,
    find_run_dir,
    read_summary,
    stage_dir,
)
from cxrlab.tracking import resumed_run, tracked_run_info

log = logging.getLogger(__name__)


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
    per_source: pd.DataFrame | None = None  # one row per source (see per_source_metrics); None without sources
    shift: dict[str, Any] = field(default_factory=dict)  # label_shift, collapse, ood (cxrlab.analysis.shift), as JSON
    warnings: list[str] = field(default_factory=list)  # the shift checks that fired, in plain words
    costly_class: str | None = None  # the class whose recall is the headline, as the data spells it (None: none)

    @property
    def y_true(self) -> np.ndarray:
        return self.predictions["label"].map({c: i for i, c in enumerate(self.classes)}).to_numpy()

    @property
    def y_pred(self) -> np.ndarray:
        return self.predictions["prediction"].map({c: i for i, c in enumerate(self.classes)}).to_numpy()


# --------------------------------------------------------------------------------------------- prediction


def predict_items(
    bundle: Any, paths: list[str], batch_size: int = 32, progress: bool = True, desc: str = "predict"
) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
    """Probabilities for every readable path. Returns (probs for the kept items, kept indices, skipped
    [{path, reason}]). Unreadable files are reported and skipped; the rest goes on."""
    probs, kept, skipped, _ = predict_items_scored(bundle, paths, batch_size, progress, desc)
    return probs, kept, skipped


def predict_items_scored(
    bundle: Any,
    paths: list[str],
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "predict",
    scorer: Any = None,
) -> tuple[np.ndarray, list[int], list[dict[str, str]], list[Any] | None]:
    """:func:`predict_items` plus, with a ``cxrlab.analysis.ood.OodScorer``, one ``OodResult`` per kept item
    (feature distance from the same forward pass, input checks on the decoded image)."""
    from cxrlab.inference.infer import forward_pass, read_batches

    probs: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[dict[str, str]] = []
    ood: list[Any] | None = [] if scorer is not None else None
    with_feats = scorer is not None and scorer.has_features
    colour = scorer is not None
    for batch in read_batches(paths, batch_size, skipped, progress, desc, colour, prepare=bundle.preprocess):
        if not batch.indices:
            continue
        p, feats = forward_pass(bundle.model, batch.stack(), features=with_feats)
        probs.append(p)
        kept += batch.indices
        if ood is not None:
            ood += scorer.score(feats, batch.grays, batch.colours)
    k = bundle.meta.num_classes
    return (np.concatenate(probs) if probs else np.zeros((0, k))), kept, skipped, ood


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
    # the costly class: the one asked for, else the one the model was trained with (recorded in its config)
    trained = (bundle.meta.config or {}).get("costly_class")
    costly = resolve_costly_class(classes, cfg.costly_class or trained or COSTLY_CLASS)
    items = resolve_items(run_dir or bundle_dir, cfg.split, cfg.data, classes, bundle.meta.config or {})
    if not items.paths:
        raise EvalError(f"no images found in {items.source}")
    prefix = cfg.split if cfg.data is None else "ext"
    from cxrlab.analysis.ood import load_scorer

    scorer = load_scorer(bundle_dir, bundle.meta)
    probs, kept, skipped, ood = predict_items_scored(
        bundle,
        items.paths,
        cfg.batch_size,
        cfg.progress,
        desc=f"evaluate {prefix} ({len(items.paths)} images)",
        scorer=scorer,
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
    per_source = None
    if items.sources is not None:
        srcs = [items.sources[i] for i in kept]
        preds["source"] = srcs
        per_source = per_source_metrics(y_true, probs, srcs, classes, cfg.n_boot, cfg.seed, cfg.ci_level)
    shift, warnings = shift_checks(res["confusion"], classes, scorer, ood)
    if ood is not None:
        preds["ood"] = [r.flag for r in ood]
        preds["ood_score"] = [r.score if r.score is not None else math.nan for r in ood]
        preds["ood_reasons"] = ["; ".join(r.reasons) for r in ood]

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
        per_source=per_source,
        shift=shift,
        warnings=warnings,
        costly_class=costly,
    )
    for w in warnings:
        log.warning("%s", w)
    paths = result.paths
    paths["predictions"] = out / PREDICTIONS_FILE
    preds.to_csv(paths["predictions"], index=False, float_format="%.6g")
    if per_source is not None:
        paths["per_source"] = out / PER_SOURCE_FILE
        per_source.to_csv(paths["per_source"], index=False, float_format="%.6g")
    paths["confusion_csv"] = out / CONFUSION_CSV
    pd.DataFrame(result.confusion, index=pd.Index(classes, name="true"), columns=classes).to_csv(paths["confusion_csv"])
    if skipped:
        paths["skipped"] = out / SKIPPED_FILE
        pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(paths["skipped"], index=False)
    if cfg.report:
        from cxrlab.report.figures import write_eval_figures

        paths.update(write_eval_figures(result, out))
    paths["metrics"] = out / EVAL_METRICS_FILE
    if cfg.report:
        paths["report"] = out / REPORT_FILE
    _write_metrics_json(result, cfg, summary, paths["metrics"])
    if cfg.report:
        from cxrlab.report.pages import write_eval_report

        write_eval_report(out, paths["report"])
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
        "costly_class": result.costly_class,
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
        "per_source": result.per_source.to_dict(orient="records") if result.per_source is not None else None,
        "shift": result.shift,
        "warnings": result.warnings,
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
            if "ood" in preds.columns:
                preds = preds.assign(ood=preds["ood"].astype(int))
            logged: dict[str, Any] = {
                f"{p}/confusion_matrix": wandb.plot.confusion_matrix(
                    y_true=result.y_true.tolist(), preds=result.y_pred.tolist(), class_names=result.classes
                ),
                f"{p}/predictions": wandb.Table(dataframe=preds),
            }
            if result.per_source is not None:
                logged[f"{p}/per_source"] = wandb.Table(dataframe=result.per_source)
            run.log(logged)
        return True
    except Exception as e:  # tracking must never break an evaluation
        log.warning("could not log the evaluation to W&B run %s: %s", info["id"], e)
        return False
