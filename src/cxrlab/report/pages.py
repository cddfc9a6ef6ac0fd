"""Self-contained HTML reports: one per evaluation, one per comparison, one per run.

Every page opens offline: figures are PNGs embedded as base64 data URIs, styles are inline, no script or font
comes from a CDN (the page template and blocks are the shared ``cxrlab.report.html`` helpers). Pages are rebuilt
from the files a stage wrote (``metrics.json``, ``predictions.csv``, ``metrics.csv`` ...), so
``cxrlab report RUN`` regenerates a run's report at any time.
"""

from __future__ import annotations

import base64
import json
import math
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


# --------------------------------------------------------------------------------------------- HTML pieces


esc = rh.esc


def file_img(path: Path, alt: str, caption: str = "") -> str:
    """A PNG file embedded as an image block (empty when the file is missing)."""
    p = Path(path)
    if not p.is_file():
        return ""
    cap = f'<div class="caption">{esc(caption)}</div>' if caption else ""
    return f'<div class="figure">{rh.img_tag(base64.b64encode(p.read_bytes()).decode("ascii"), alt=alt)}{cap}</div>'


def fig_img(fig: Figure | None, alt: str, caption: str = "") -> str:
    return "" if fig is None else rh.figure_tag(fig, caption or None, dpi=DPI, alt=alt)


def page(title: str, parts: list[str], subtitle: str | None = None) -> str:
    # additions to the shared stylesheet: headline cards and figures side by side
    style = "<style>\n" + rh.asset("cards.css") + "</style>"
    return rh.page(title, [style, *[p for p in parts if p]], subtitle=subtitle)


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(f):
        return "–"
    return f"{f:.{digits}f}"


def fmt_ci(ci: Any, digits: int = 3) -> str:
    if not ci or any(v is None or not math.isfinite(float(v)) for v in ci):
        return ""
    return f"[{float(ci[0]):.{digits}f}, {float(ci[1]):.{digits}f}]"


def _card(label: str, value: Any, ci: Any = None) -> str:
    c = fmt_ci(ci)
    return (
        f"<div class='card'><div>{esc(label)}</div><div class='v'>{fmt(value)}</div>"
        f"<div class='ci'>{esc('95% CI ' + c) if c else '&nbsp;'}</div></div>"
    )


def links(items: list[tuple[str, str]]) -> str:
    """A line of relative links (href, text)."""
    return "<p>" + " · ".join(f"<a href='{esc(h)}'>{esc(t)}</a>" for h, t in items) + "</p>"


# --------------------------------------------------------------------------------------------- eval report


def load_eval_doc(eval_dir: Path) -> dict[str, Any]:
    p = Path(eval_dir) / EVAL_METRICS_FILE
    if not p.is_file():
        raise ReportError(f"{eval_dir} holds no metrics.json; run `cxrlab evaluate` first")
    return json.loads(p.read_text())


def _error_gallery(pred_csv: Path, limit: int = 12) -> str:
    """The most confident mistakes as thumbnails: where people would rather look than read."""
    if not pred_csv.is_file():
        return ""
    pred = pd.read_csv(pred_csv)
    if "correct" not in pred.columns:
        return ""
    wrong = pred[~pred["correct"].astype(bool)].sort_values("confidence", ascending=False).head(limit)
    if wrong.empty:
        return rh.paragraph("No misclassified images.")
    from cxrlab.data.io import ImageReadError, read_xray

    items = []
    for r in wrong.itertuples(index=False):
        try:
            g = read_xray(r.path)
        except (ImageReadError, OSError):
            continue
        cap = f"true {r.label} → {r.prediction} ({float(r.confidence):.2f}) {Path(r.path).name}"
        items.append((rh.array_to_png_b64(g, max_side=128), cap))
    return rh.gallery(items) if items else ""


def _with_ci(row: dict[str, Any], name: str) -> str:
    ci = fmt_ci((row.get(name + "_lo"), row.get(name + "_hi")), 2)
    return f"{fmt(row[name])} {ci}".strip()


def eval_section_html(eval_dir: Path, level: int = 2, gallery: bool = True) -> str:
    """The body of an evaluation report, rebuilt from ``eval_dir`` (metrics.json + PNGs + predictions.csv)."""
    d = Path(eval_dir)
    doc = load_eval_doc(d)
    p = doc.get("prefix", "test")
    m, ci = doc.get("metrics", {}), doc.get("ci", {})
    classes = doc.get("classes", [])
    parts = [rh.callout(w, "error", "Shift:") for w in doc.get("warnings") or []]
    absent = doc.get("absent_classes") or []
    if absent:
        parts.append(
            rh.callout(
                f"Classes absent from this data: {', '.join(absent)}. Their per-class metrics are undefined; macro "
                f"averages are over the present classes only ({', '.join(doc.get('present_classes', []))}).",
                "warn",
            )
        )
    if doc.get("n_skipped"):
        parts.append(
            rh.callout(f"{doc['n_skipped']} file(s) could not be read and were skipped (listed below).", "warn")
        )
    # the costly class the evaluation resolved (older metrics.json: looked up by its default name)
    costly = doc.get("costly_class") or costly_class(classes) or (doc.get("present_classes") or classes or [None])[0]
    cards = [
        _card("accuracy", m.get(f"{p}/accuracy"), ci.get(f"{p}/accuracy")),
        _card("macro F1" + (" (present classes)" if absent else ""), m.get(f"{p}/f1_macro"), ci.get(f"{p}/f1_macro")),
    ]
    if costly and f"{p}/recall_{costly}" in m:
        cards.append(_card(f"{costly} recall", m.get(f"{p}/recall_{costly}"), ci.get(f"{p}/recall_{costly}")))
    cards += [_card("macro ROC AUC", m.get(f"{p}/auc_macro")), _card("ECE (15 bins)", m.get(f"{p}/ece"))]
    parts.append(f"<div class='cards'>{''.join(cards)}</div>")
    parts.append(
        rh.kv(
            [
                ("images", f"{doc.get('n')} from {doc.get('data')}"),
                ("dataset version", doc.get("dataset_version")),
                ("macro precision", f"{fmt(m.get(f'{p}/precision_macro'))} {fmt_ci(ci.get(f'{p}/precision_macro'))}"),
                ("macro recall", f"{fmt(m.get(f'{p}/recall_macro'))} {fmt_ci(ci.get(f'{p}/recall_macro'))}"),
                ("NLL / Brier", f"{fmt(m.get(f'{p}/nll'))} / {fmt(m.get(f'{p}/brier'))}"),
                ("intervals", doc.get("ci_method", "")),
            ]
        )
    )
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
    parts.append(rh.section("Per class", rh.table(rows, columns=cols), level=level))
    if doc.get("per_source"):
        parts.append(rh.section("Per source", _per_source_table(doc["per_source"], classes), level=level))
    shift = doc.get("shift") or {}
    if shift:
        parts.append(rh.section("Shift checks", _shift_kv(shift), level=level))
    figs = [
        file_img(d / CONFUSION_PNG, "confusion matrix", "confusion matrix (colour = share of the true class)"),
        file_img(d / RELIABILITY_PNG, "reliability diagram", "calibration: accuracy vs confidence"),
        file_img(d / ROC_PNG, "ROC curves", "one-vs-rest ROC curves"),
    ]
    parts.append(rh.section("Figures", f"<div class='figs'>{''.join(f for f in figs if f)}</div>", level=level))
    if gallery:
        g = _error_gallery(d / PREDICTIONS_FILE)
        if g:
            parts.append(rh.section("Most confident mistakes", g, level=level))
    if doc.get("skipped"):
        parts.append(rh.section("Skipped files", rh.table(doc["skipped"], columns=["path", "reason"]), level=level))
    files = sorted(set(doc.get("files", {}).values()))
    parts.append(f"<p class='caption'>Files: {esc(', '.join(files))}</p>")
    return "\n".join(parts)


def _per_source_table(per_source: list[dict[str, Any]], classes: list[str]) -> str:
    shown = [c for c in classes if any(r.get(f"n_{c}") for r in per_source)]
    rows = []
    for r in per_source:
        row = [r["source"], r["n"], _with_ci(r, "accuracy")]
        row += [f"{_with_ci(r, f'recall_{c}')} ({r[f'n_{c}']})" if r.get(f"n_{c}") else "–" for c in shown]
        row.append(", ".join(f"{c} {r[f'predicted_{c}']}" for c in classes if r.get(f"predicted_{c}")))
        rows.append(row)
    cols = ["source", "images", "accuracy [95% CI]", *[f"recall {c} [95% CI] (n)" for c in shown], "predicted as"]
    return rh.table(rows, columns=cols)


def _shift_kv(shift: dict[str, Any]) -> str:
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
    return rh.kv(items)


def write_eval_report(eval_dir: Path, out: Path | None = None) -> Path:
    """``<eval_dir>/report.html`` (or ``out``) from the evaluation's files."""
    d = Path(eval_dir)
    doc = load_eval_doc(d)
    on = {"test": "test split", "val": "validation split"}.get(doc.get("prefix", ""), "external data")
    title = f"Evaluation of {Path(doc.get('run_dir') or doc.get('bundle') or d).name} on the {on}"
    sub = f"model {doc.get('bundle')}" + (f" · run {doc['run_id']}" if doc.get("run_id") else "")
    return rh.write_page(Path(out) if out else d / EVAL_REPORT, page(title, [eval_section_html(d)], subtitle=sub))


# --------------------------------------------------------------------------------------------- run report


def _latest_eval_dirs(run_dir: Path) -> list[Path]:
    ds = [d for d in run_dir.glob("eval-*") if (d / EVAL_METRICS_FILE).is_file()]
    order = {"eval-test": 0, "eval-val": 1}
    return sorted(ds, key=lambda d: (order.get(d.name, 2), d.name))


def _audit_section(audit_dir: Path | None, base: Path) -> str:
    """Summary of the data audit (cxrlab.data.audit's audit.json): confound score and warnings."""
    if audit_dir is None:
        return ""
    a = Path(audit_dir)
    j = a / "audit.json" if a.is_dir() else a
    if not j.is_file():
        return ""
    try:
        doc = json.loads(j.read_text())
    except json.JSONDecodeError:
        return ""
    parts = []
    conf = doc.get("confound") if isinstance(doc.get("confound"), dict) else {}
    warnings = list(doc.get("warnings") or [])
    warnings += [w for w in conf.get("warnings") or [] if w not in warnings]
    for w in warnings:
        parts.append(rh.callout(str(w), "warn"))
    if conf.get("groups"):
        chance = conf.get("chance_balanced_accuracy")
        rows = [
            [name, g.get("balanced_accuracy"), chance, ", ".join(g.get("features", []))]
            for name, g in conf["groups"].items()
            if isinstance(g, dict)
        ]
        if isinstance(conf.get("all"), dict):
            rows.append(["all trivial statistics", conf["all"].get("balanced_accuracy"), chance, ""])
        parts.append(
            rh.paragraph(
                "Confound score: how well trivial image statistics alone predict the label (cross-validated "
                "balanced accuracy). Far above chance means the model can learn the source instead of the disease."
            )
        )
        parts.append(
            rh.table(rows, columns=["statistics", "balanced accuracy", "chance", "features"], float_fmt="{:.3f}")
        )
    elif not warnings:
        parts.append(rh.callout("No confound or data-quality warnings.", "ok"))
    if doc.get("text_share"):
        parts.append(rh.kv([(f"text/markers in {k}", f"{float(v):.0%}") for k, v in doc["text_share"].items()]))
    html_path = a / "audit.html" if a.is_dir() else a.with_name("audit.html")
    if html_path.is_file():
        parts.append(links([(_rel(html_path, base), "full audit report")]))
    return rh.section("Data audit", *parts)


def _rel(target: Path, base: Path) -> str:
    """``target`` relative to the folder of the page being written (links survive moving the whole folder)."""
    import os

    try:
        return Path(os.path.relpath(Path(target).resolve(), Path(base).resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(target).resolve().as_uri()


def _explain_section(rd: Path, base: Path) -> str:
    """Links to the run's explanation pages and their mean attention shares (from attention.json)."""
    explains = sorted(rd.glob(f"explain*/{EXPLAIN_HTML}"), key=lambda p: p.stat().st_mtime)
    if not explains:
        return ""
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
    return rh.section(
        "Explanations",
        rh.paragraph(
            "Mean share of the Grad-CAM mass per region: a model that looks at text or the border instead of the "
            "lungs has learned a shortcut."
        ),
        rh.table(rows, columns=cols, float_fmt="{:.3f}"),
        links([(_rel(e, base), f"{e.parent.name}: per-image table") for e in explains]),
        _review_part(rd),
    )


def _review_part(rd: Path) -> str:
    """The reviewed localisation agreement (``cxrlab review RUN --export``), when the run has been reviewed."""
    from cxrlab.review.core import read_agreement

    a = read_agreement(rd)
    if not a or "review_yes" not in a:
        return ""
    rows = [[a["review_yes"], a.get("review_yes_ci_low"), a.get("review_yes_ci_high"), int(a.get("review_n", 0)),
             a.get("review_cam_in_region")]]  # fmt: skip
    cols = ["region holds the finding (yes)", "95% CI low", "95% CI high", "answers", "CAM mass in drawn regions"]
    return rh.paragraph("Radiologist review of the Grad-CAM regions:") + rh.table(
        rows, columns=cols, float_fmt="{:.3f}"
    )


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
    parts = [rh.kv(meta), _audit_section(audit_dir, base)]
    best = summary.get("best_epoch")
    curves = training_curves_figure(
        rd / METRICS_FILE, int(best) if best is not None else None, cfg.get("costly_class") or COSTLY_CLASS
    )
    if curves is not None:
        parts.append(rh.section("Training", fig_img(curves, "training curves", "per-epoch loss and scores")))
    evals = _latest_eval_dirs(rd)
    for d in evals:
        doc = load_eval_doc(d)
        on = {"test": "test split", "val": "validation split"}.get(doc.get("prefix", ""), f"external data ({d.name})")
        parts.append(
            rh.section(
                f"Evaluation on the {on}",
                eval_section_html(d, level=3, gallery=d == evals[0]),
                links([(_rel(d / EVAL_REPORT, base), "this evaluation on its own page")]),
            )
        )
    parts.append(_explain_section(rd, base))
    return rh.write_page(path, page(f"Run {run_id}", parts, subtitle=str(rd)))


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
