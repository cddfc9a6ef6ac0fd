"""Self-contained HTML reports: one per evaluation, one per comparison, one per run.

Every page opens offline: figures are PNGs embedded as base64 data URIs, styles are inline, no script or font
comes from a CDN. The HTML is in ``templates/eval.html``, ``eval_section.html`` and ``run.html``; this module
only computes their context from the files a stage wrote (``metrics.json``, ``predictions.csv``,
``metrics.csv`` ...), so ``cxrlab report RUN`` regenerates a run's report at any time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from cxrlab.data.classes import COSTLY_CLASS, costly_class
from cxrlab.errors import CxrlabError
from cxrlab.report import html as rh
from cxrlab.report.figures import DPI, training_curves_figure
from cxrlab.runs import (
    ATTENTION_FILE,
    CONFUSION_PNG,
    EVAL_METRICS_FILE,
    EXPLAIN_HTML,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RELIABILITY_PNG,
    REPORT_FILE,
    ROC_PNG,
    SUMMARY_FILE,
    read_run_config,
    read_summary,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


RUN_REPORT = REPORT_FILE
EVAL_REPORT = REPORT_FILE


class ReportError(CxrlabError):
    """A report cannot be built from the given directory."""


# --------------------------------------------------------------------------------------------- context pieces


fmt, fmt_ci, file_img = rh.fmt, rh.fmt_ci, rh.png_file


def fig_img(fig: Figure | None, alt: str, caption: str = "") -> rh.Png | None:
    return None if fig is None else rh.figure(fig, caption or None, dpi=DPI, alt=alt)


def _card(label: str, value: Any, ci: Any = None) -> dict[str, str]:
    """A headline number for the ``card`` macro."""
    return {"label": label, "value": fmt(value), "ci": fmt_ci(ci)}


# --------------------------------------------------------------------------------------------- eval report


def load_eval_doc(eval_dir: Path) -> dict[str, Any]:
    p = Path(eval_dir) / EVAL_METRICS_FILE
    if not p.is_file():
        raise ReportError(f"{eval_dir} holds no metrics.json; run `cxrlab evaluate` first")
    return json.loads(p.read_text())


def _error_gallery(pred_csv: Path, limit: int = 12) -> list[tuple[str, str]] | None:
    """The most confident mistakes as thumbnails: where people would rather look than read (None: nothing to
    show; an empty list: no mistakes)."""
    if not pred_csv.is_file():
        return None
    pred = pd.read_csv(pred_csv)
    if "correct" not in pred.columns:
        return None
    wrong = pred[~pred["correct"].astype(bool)].sort_values("confidence", ascending=False).head(limit)
    if wrong.empty:
        return []
    from cxrlab.data.io import ImageReadError, read_xray

    items = []
    for r in wrong.itertuples(index=False):
        try:
            g = read_xray(r.path)
        except (ImageReadError, OSError):
            continue
        cap = f"true {r.label} → {r.prediction} ({float(r.confidence):.2f}) {Path(r.path).name}"
        items.append((rh.array_to_png_b64(g, max_side=128), cap))
    return items or None


def _with_ci(row: dict[str, Any], name: str) -> rh.Cell:
    return rh.ci_cell(row[name], (row.get(name + "_lo"), row.get(name + "_hi")), ci_digits=2)


def eval_context(eval_dir: Path, gallery: bool = True) -> dict[str, Any]:
    """What the ``eval_section`` macro draws for ``eval_dir`` (metrics.json + PNGs + predictions.csv)."""
    d = Path(eval_dir)
    doc = load_eval_doc(d)
    p = doc.get("prefix", "test")
    m, ci = doc.get("metrics", {}), doc.get("ci", {})
    classes = doc.get("classes", [])
    absent = doc.get("absent_classes") or []
    # the costly class the evaluation resolved (older metrics.json: looked up by its default name)
    costly = doc.get("costly_class") or costly_class(classes) or (doc.get("present_classes") or classes or [None])[0]
    cards = [
        _card("accuracy", m.get(f"{p}/accuracy"), ci.get(f"{p}/accuracy")),
        _card("macro F1" + (" (present classes)" if absent else ""), m.get(f"{p}/f1_macro"), ci.get(f"{p}/f1_macro")),
    ]
    if costly and f"{p}/recall_{costly}" in m:
        cards.append(_card(f"{costly} recall", m.get(f"{p}/recall_{costly}"), ci.get(f"{p}/recall_{costly}")))
    cards += [_card("macro ROC AUC", m.get(f"{p}/auc_macro")), _card("ECE (15 bins)", m.get(f"{p}/ece"))]
    facts = [
        ("images", f"{doc.get('n')} from {doc.get('data')}"),
        ("dataset version", doc.get("dataset_version")),
        ("macro precision", f"{fmt(m.get(f'{p}/precision_macro'))} {fmt_ci(ci.get(f'{p}/precision_macro'))}"),
        ("macro recall", f"{fmt(m.get(f'{p}/recall_macro'))} {fmt_ci(ci.get(f'{p}/recall_macro'))}"),
        ("NLL / Brier", f"{fmt(m.get(f'{p}/nll'))} / {fmt(m.get(f'{p}/brier'))}"),
        ("intervals", doc.get("ci_method", "")),
    ]
    rows = []
    for r in doc.get("per_class", []):
        if not r.get("present", True):
            rows.append([r["class"], 0, r.get("predicted", 0), "absent", "absent", "absent", "–", "–", r.get("fp")])
            continue
        rows.append(
            [
                r["class"],
                r["support"],
                r.get("predicted", ""),
                *(_with_ci(r, name) for name in ("precision", "recall", "f1")),
                fmt(r.get("auc")),
                r.get("fn"),
                r.get("fp"),
            ]
        )
    cols = ["class", "images", "predicted", "precision [95% CI]", "recall (per-class accuracy) [95% CI]", "F1 [95% CI]"]
    cols += ["ROC AUC", "false neg.", "false pos."]
    figs = [
        file_img(d / CONFUSION_PNG, "confusion matrix", "confusion matrix (colour = share of the true class)"),
        file_img(d / RELIABILITY_PNG, "reliability diagram", "calibration: accuracy vs confidence"),
        file_img(d / ROC_PNG, "ROC curves", "one-vs-rest ROC curves"),
    ]
    return {
        "warnings": doc.get("warnings") or [],
        "absent": absent,
        "present": doc.get("present_classes", []),
        "n_skipped": doc.get("n_skipped") or 0,
        "cards": cards,
        "facts": facts,
        "per_class": rh.table(rows, columns=cols),
        "per_source": _per_source_table(doc["per_source"], classes) if doc.get("per_source") else None,
        "shift": _shift_kv(doc.get("shift") or {}),
        "figures": [f for f in figs if f],
        "gallery": _error_gallery(d / PREDICTIONS_FILE) if gallery else None,
        "skipped": rh.table(doc["skipped"], columns=["path", "reason"]) if doc.get("skipped") else None,
        "files": ", ".join(sorted(set(doc.get("files", {}).values()))),
    }


def _per_source_table(per_source: list[dict[str, Any]], classes: list[str]) -> rh.Table:
    shown = [c for c in classes if any(r.get(f"n_{c}") for r in per_source)]
    rows = []
    for r in per_source:
        row: list[Any] = [r["source"], r["n"], _with_ci(r, "accuracy")]
        for c in shown:
            rc = _with_ci(r, f"recall_{c}")
            row.append(rc._replace(ci=f"{rc.ci} ({r[f'n_{c}']})".strip()) if r.get(f"n_{c}") else "–")
        row.append(", ".join(f"{c} {r[f'predicted_{c}']}" for c in classes if r.get(f"predicted_{c}")))
        rows.append(row)
    cols = ["source", "images", "accuracy [95% CI]", *[f"recall {c} [95% CI] (n)" for c in shown], "predicted as"]
    return rh.table(rows, columns=cols)


def _shift_kv(shift: dict[str, Any]) -> list[tuple[str, Any]]:
    items = []
    if "label_shift" in shift:
        ls = shift["label_shift"]
        items.append(("label shift (BBSE)", ls.get("message", "")))
    if "collapse" in shift:
        items.append(("collapse", shift["collapse"].get("message", "")))
    if "ood" in shift:
        o = shift["ood"]
        why = ", ".join(f"{k}: {v}" for k, v in (o.get("reasons") or {}).items())
        items.append(
            ("out of distribution", f"{o['n_flagged']} of {o['n']} images flagged" + (f" ({why})" if why else ""))
        )
    if shift.get("note"):
        items.append(("note", shift["note"]))
    return items


def write_eval_report(eval_dir: Path, out: Path | None = None) -> Path:
    """``<eval_dir>/report.html`` (or ``out``) from the evaluation's files."""
    d = Path(eval_dir)
    doc = load_eval_doc(d)
    on = {"test": "test split", "val": "validation split"}.get(doc.get("prefix", ""), "external data")
    title = f"Evaluation of {Path(doc.get('run_dir') or doc.get('bundle') or d).name} on the {on}"
    sub = f"model {doc.get('bundle')}" + (f" · run {doc['run_id']}" if doc.get("run_id") else "")
    html = rh.render("eval.html", title=title, subtitle=sub, ev=eval_context(d))
    return rh.write_page(Path(out) if out else d / EVAL_REPORT, html)


# --------------------------------------------------------------------------------------------- run report


def _latest_eval_dirs(run_dir: Path) -> list[Path]:
    ds = [d for d in run_dir.glob("eval-*") if (d / EVAL_METRICS_FILE).is_file()]
    order = {"eval-test": 0, "eval-val": 1}
    return sorted(ds, key=lambda d: (order.get(d.name, 2), d.name))


def _audit_context(audit_dir: Path | None, base: Path) -> dict[str, Any] | None:
    """Summary of the data audit (cxrlab.data.audit's audit.json): confound score and warnings."""
    if audit_dir is None:
        return None
    a = Path(audit_dir)
    j = a / "audit.json" if a.is_dir() else a
    if not j.is_file():
        return None
    try:
        doc = json.loads(j.read_text())
    except json.JSONDecodeError:
        return None
    conf = doc.get("confound") if isinstance(doc.get("confound"), dict) else {}
    warnings = [str(w) for w in doc.get("warnings") or []]
    warnings += [str(w) for w in conf.get("warnings") or [] if w not in warnings]
    confound = None
    if conf.get("groups"):
        chance = conf.get("chance_balanced_accuracy")
        rows = [
            [name, g.get("balanced_accuracy"), chance, ", ".join(g.get("features", []))]
            for name, g in conf["groups"].items()
            if isinstance(g, dict)
        ]
        if isinstance(conf.get("all"), dict):
            rows.append(["all trivial statistics", conf["all"].get("balanced_accuracy"), chance, ""])
        cols = ["statistics", "balanced accuracy", "chance", "features"]
        confound = rh.table(rows, columns=cols, float_fmt="{:.3f}")
    html_path = a / "audit.html" if a.is_dir() else a.with_name("audit.html")
    return {
        "warnings": warnings,
        "confound": confound,
        "text_share": [(f"text/markers in {k}", f"{float(v):.0%}") for k, v in (doc.get("text_share") or {}).items()],
        "link": (_rel(html_path, base), "full audit report") if html_path.is_file() else None,
    }


def _rel(target: Path, base: Path) -> str:
    """``target`` relative to the folder of the page being written (links survive moving the whole folder)."""
    import os

    try:
        return Path(os.path.relpath(Path(target).resolve(), Path(base).resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(target).resolve().as_uri()


def _explain_context(rd: Path, base: Path) -> dict[str, Any] | None:
    """Links to the run's explanation pages and their mean attention shares (from attention.json)."""
    explains = sorted(rd.glob(f"explain*/{EXPLAIN_HTML}"), key=lambda p: p.stat().st_mtime)
    if not explains:
        return None
    rows = []
    for e in explains:
        doc: dict[str, Any] = {}
        if (e.parent / ATTENTION_FILE).is_file():
            try:
                doc = json.loads((e.parent / ATTENTION_FILE).read_text())
            except json.JSONDecodeError:
                doc = {}
        s = doc.get("summary", {}) if isinstance(doc.get("summary"), dict) else {}
        rows.append(
            [
                e.parent.name,
                doc.get("subset", ""),
                s.get("n_images"),
                s.get("in_lungs"),
                s.get("on_text"),
                s.get("on_border"),
            ]
        )
    cols = ["explanation", "subset", "images", "attention in lungs", "attention on text", "attention on border"]
    return {
        "table": rh.table(rows, columns=cols, float_fmt="{:.3f}"),
        "links": [(_rel(e, base), f"{e.parent.name}: per-image table") for e in explains],
        "review": _review_table(rd),
    }


def _review_table(rd: Path) -> rh.Table | None:
    """The reviewed localisation agreement (``cxrlab review RUN --export``), when the run has been reviewed."""
    from cxrlab.review.core import read_agreement

    a = read_agreement(rd)
    if not a or "review_yes" not in a:
        return None
    rows = [[a["review_yes"], a.get("review_yes_ci_low"), a.get("review_yes_ci_high"), int(a.get("review_n", 0)),
             a.get("review_cam_in_region")]]  # fmt: skip
    cols = ["region holds the finding (yes)", "95% CI low", "95% CI high", "answers", "CAM mass in drawn regions"]
    return rh.table(rows, columns=cols, float_fmt="{:.3f}")


def write_run_report(run_dir: Path, out: Path | None = None, audit_dir: Path | None = None) -> Path:
    """The report of a run: training curves, evaluation(s), calibration, audit summary, explanation links."""
    rd = Path(run_dir)
    if not rd.is_dir():
        raise ReportError(f"run directory not found: {rd}")
    summary: dict[str, Any] = {}
    if (rd / SUMMARY_FILE).is_file():
        summary = read_summary(rd)
    elif not (rd / METRICS_FILE).is_file() and not _latest_eval_dirs(rd):
        raise ReportError(f"{rd} is not a run directory (no summary.json, metrics.csv or eval-*/)")
    path = Path(out) if out else rd / RUN_REPORT
    base = path.parent
    if audit_dir is None:
        audit_dir = _find_pipeline_audit(rd)
    run_id = summary.get("run_id") or rd.name
    cfg = read_run_config(rd)
    meta = [(k, cfg[k]) for k in ("model_name", "img_size", "batch_size", "optimizer", "learning_rate") if k in cfg]
    meta += [(k, cfg[k]) for k in ("lr_scheduler", "epochs") if k in cfg]
    meta += [
        (k, summary[k]) for k in ("best_epoch", "epochs_run", "dataset_version", "data") if summary.get(k) is not None
    ]
    if summary.get("wall_s"):
        meta.append(("training time", f"{float(summary['wall_s']):.0f} s"))
    best = summary.get("best_epoch")
    curves = training_curves_figure(
        rd / METRICS_FILE, int(best) if best is not None else None, cfg.get("costly_class") or COSTLY_CLASS
    )
    evals = []
    latest = _latest_eval_dirs(rd)
    for d in latest:
        doc = load_eval_doc(d)
        on = {"test": "test split", "val": "validation split"}.get(doc.get("prefix", ""), f"external data ({d.name})")
        evals.append(
            {
                "on": on,
                "body": eval_context(d, gallery=d == latest[0]),
                "link": (_rel(d / EVAL_REPORT, base), "this evaluation on its own page"),
            }
        )
    html = rh.render(
        "run.html",
        title=f"Run {run_id}",
        subtitle=str(rd),
        meta=meta,
        audit=_audit_context(audit_dir, base),
        curves=fig_img(curves, "training curves", "per-epoch loss and scores"),
        evals=evals,
        explain=_explain_context(rd, base),
    )
    return rh.write_page(path, html)


def _find_pipeline_audit(run_dir: Path) -> Path | None:
    """The audit of the pipeline that produced ``run_dir`` (``DIR/runs/<id>`` -> ``DIR/audit``)."""
    for base in (run_dir.parent.parent, run_dir.parent):
        pj = base / "pipeline.json"
        if pj.is_file():
            try:
                a = json.loads(pj.read_text()).get("audit")
            except json.JSONDecodeError:
                a = None
            if a and Path(a).exists():
                return Path(a)
        if (base / "audit" / "audit.json").is_file():
            return base / "audit"
    return None
