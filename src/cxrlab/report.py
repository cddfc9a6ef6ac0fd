"""Self-contained HTML reports: one per evaluation, one per comparison, one per run.

Every page opens offline: figures are PNGs embedded as base64 data URIs, styles are inline, no script or font
comes from a CDN. Pages are rebuilt from the files a stage wrote (``metrics.json``, ``predictions.csv``,
``metrics.csv`` ...), so ``cxrlab report RUN`` regenerates a run's report at any time.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxrlab.errors import CxrlabError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cxrlab.evaluate import CompareResult, EvalResult

RUN_REPORT = "report.html"
EVAL_REPORT = "report.html"


class ReportError(CxrlabError):
    """A report cannot be built from the given directory."""


# --------------------------------------------------------------------------------------------- figures


def _figure(w: float, h: float, ncols: int = 1, nrows: int = 1, **kw: Any) -> tuple[Figure, Any]:
    """A matplotlib Figure without pyplot (no global state, no GUI backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, **kw)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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


def training_curves_figure(metrics_csv: Path, best_epoch: int | None = None) -> Figure | None:
    """Loss and validation scores per epoch from a run's ``metrics.csv``."""
    df = read_epoch_metrics(metrics_csv)
    if df is None or df.empty:
        return None
    loss_cols = [c for c in df.columns if c.endswith("/loss")]
    score_cols = [
        c
        for c in ("val/f1_macro", "val/accuracy", "train/f1_macro", "train/accuracy", "val/recall_COVID19")
        if c in df.columns
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
        if best_epoch is not None:
            a.axvline(best_epoch, color="0.6", ls=":", lw=1, label=f"best epoch {best_epoch}")
        if a.lines:
            a.legend(fontsize=7)
    return fig


def read_epoch_metrics(metrics_csv: Path) -> pd.DataFrame | None:
    """One row per epoch (Lightning's CSV logger may write several partial rows per epoch: merge them)."""
    p = Path(metrics_csv)
    if not p.is_file():
        return None
    try:
        df = pd.read_csv(p)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None
    if "epoch" not in df.columns or df.empty:
        return None
    num = df.select_dtypes("number")
    return num.groupby("epoch", as_index=False).agg(lambda s: s.dropna().iloc[-1] if s.notna().any() else np.nan)


def write_eval_figures(result: EvalResult, out: Path) -> dict[str, Path]:
    """confusion_matrix.png, reliability.png and roc.png of an evaluation."""
    out = Path(out)
    paths = {
        "confusion_png": _save(confusion_figure(result.confusion, result.classes), out / "confusion_matrix.png"),
        "reliability_png": _save(reliability_figure(result.reliability, result.ece), out / "reliability.png"),
    }
    fig = roc_figure(result.predictions, result.classes)
    if fig is not None:
        paths["roc_png"] = _save(fig, out / "roc.png")
    return paths


def write_compare_confusion(result: CompareResult, path: Path) -> Path:
    classes = result.baseline.classes
    k = len(classes)
    fig, (a, b) = _figure(2 * (1.6 + 1.1 * k), 1.3 + 1.0 * k, ncols=2)
    plot_confusion(a, result.baseline.confusion, classes, "baseline")
    plot_confusion(b, result.challenger.confusion, classes, "challenger")
    return _save(fig, Path(path))


# --------------------------------------------------------------------------------------------- HTML pieces

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1100px;padding:1.2em;
color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{padding:.25em .7em;border-bottom:1px solid #eee;
text-align:right}th:first-child,td:first-child{text-align:left}th{background:#f6f6f6}
.meta{color:#555;font-size:.9em}.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:.8em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em .9em;min-width:9em}
.card .v{font-size:1.5em;font-weight:600}.card .ci{color:#666;font-size:.8em}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em .8em;margin:.8em 0}
.ok{background:#eaf6ea;border-left:4px solid #3a3;padding:.5em .8em;margin:.8em 0}
.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}figure{margin:0}
figcaption{font-size:.85em;color:#555}img.plot{max-width:100%;height:auto;border:1px solid #eee}
.figs figure{max-width:48%}
.gallery{display:flex;flex-wrap:wrap;gap:.6em}.gallery figure{width:140px;font-size:.75em}
.gallery img{width:140px;height:140px;object-fit:contain;background:#000}
code{background:#f3f3f3;padding:0 .2em}
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def img_tag(png: bytes, alt: str, cls: str = "plot") -> str:
    """An <img> with the PNG embedded as a data URI (the page stays self-contained)."""
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{esc(alt)}" src="data:image/png;base64,{b64}">'


def file_img(path: Path, alt: str, caption: str = "") -> str:
    p = Path(path)
    if not p.is_file():
        return ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure>{img_tag(p.read_bytes(), alt)}{cap}</figure>"


def fig_img(fig: Figure | None, alt: str, caption: str = "") -> str:
    if fig is None:
        return ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure>{img_tag(_png_bytes(fig), alt)}{cap}</figure>"


def page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>\n{body}\n"
        "<p class='meta'>Generated by cxrlab. Self-contained: opens offline.</p></body></html>\n"
    )


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    try:
        f = float(x)
    except (TypeError, ValueError):
        return esc(x)
    if not math.isfinite(f):
        return "–"
    return f"{f:.{digits}f}"


def fmt_ci(ci: Any, digits: int = 3) -> str:
    if not ci or any(v is None or not math.isfinite(float(v)) for v in ci):
        return ""
    return f"[{float(ci[0]):.{digits}f}, {float(ci[1]):.{digits}f}]"


def table_html(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _card(label: str, value: Any, ci: Any = None) -> str:
    c = fmt_ci(ci)
    return (
        f"<div class='card'><div>{esc(label)}</div><div class='v'>{fmt(value)}</div>"
        f"<div class='ci'>{esc('95% CI ' + c) if c else '&nbsp;'}</div></div>"
    )


def _costly_class(classes: list[str]) -> str | None:
    from cxrlab.evaluate import COSTLY_CLASS, _norm_name

    return next((c for c in classes if _norm_name(c) == _norm_name(COSTLY_CLASS)), None)


# --------------------------------------------------------------------------------------------- eval report


def load_eval_doc(eval_dir: Path) -> dict[str, Any]:
    p = Path(eval_dir) / "metrics.json"
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
        return "<p>No misclassified images.</p>"
    import cv2

    from cxrlab.data.io import ImageReadError, read_xray

    figs = []
    for r in wrong.itertuples(index=False):
        try:
            g = read_xray(r.path)
        except (ImageReadError, OSError):
            continue
        s = 140 / max(g.shape)
        g = cv2.resize(g, (max(1, round(g.shape[1] * s)), max(1, round(g.shape[0] * s))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".png", g)
        if not ok:
            continue
        figs.append(
            f"<figure>{img_tag(buf.tobytes(), Path(r.path).name, cls='thumb')}<figcaption>true {esc(r.label)} → "
            f"<b>{esc(r.prediction)}</b> ({float(r.confidence):.2f})<br>{esc(Path(r.path).name)}</figcaption></figure>"
        )
    if not figs:
        return ""
    return f"<div class='gallery'>{''.join(figs)}</div>"


def _with_ci(row: dict[str, Any], name: str) -> str:
    return f"{fmt(row[name])} <span class='meta'>{fmt_ci((row.get(name + '_lo'), row.get(name + '_hi')))}</span>"


def eval_section_html(eval_dir: Path, heading_level: int = 2, gallery: bool = True) -> str:
    """The body of an evaluation report, rebuilt from ``eval_dir`` (metrics.json + PNGs + predictions.csv)."""
    d = Path(eval_dir)
    doc = load_eval_doc(d)
    h = f"h{heading_level}"
    p = doc.get("prefix", "test")
    m, ci = doc.get("metrics", {}), doc.get("ci", {})
    classes = doc.get("classes", [])
    parts = []
    absent = doc.get("absent_classes") or []
    if absent:
        parts.append(
            f"<div class='warn'>Classes absent from this data: <b>{esc(', '.join(absent))}</b>. Their per-class "
            f"metrics are undefined; macro averages are over the present classes only "
            f"({esc(', '.join(doc.get('present_classes', [])))}).</div>"
        )
    if doc.get("n_skipped"):
        parts.append(
            f"<div class='warn'>{doc['n_skipped']} file(s) could not be read and were skipped (listed below).</div>"
        )
    costly = _costly_class(classes) or (doc.get("present_classes") or classes or [None])[0]
    cards = [
        _card("accuracy", m.get(f"{p}/accuracy"), ci.get(f"{p}/accuracy")),
        _card("macro F1" + (" (present classes)" if absent else ""), m.get(f"{p}/f1_macro"), ci.get(f"{p}/f1_macro")),
    ]
    if costly and f"{p}/recall_{costly}" in m:
        cards.append(_card(f"{costly} recall", m.get(f"{p}/recall_{costly}"), ci.get(f"{p}/recall_{costly}")))
    cards += [_card("macro ROC AUC", m.get(f"{p}/auc_macro")), _card("ECE (15 bins)", m.get(f"{p}/ece"))]
    parts.append(f"<div class='cards'>{''.join(cards)}</div>")
    parts.append(
        f"<p class='meta'>n = {doc.get('n')} images from {esc(doc.get('data'))}; dataset version "
        f"<code>{esc(doc.get('dataset_version'))}</code>; {esc(doc.get('ci_method', ''))}. Macro precision "
        f"{fmt(m.get(f'{p}/precision_macro'))} {fmt_ci(ci.get(f'{p}/precision_macro'))}, macro recall "
        f"{fmt(m.get(f'{p}/recall_macro'))} {fmt_ci(ci.get(f'{p}/recall_macro'))}, NLL {fmt(m.get(f'{p}/nll'))}, "
        f"Brier {fmt(m.get(f'{p}/brier'))}.</p>"
    )
    rows = []
    for r in doc.get("per_class", []):
        if not r.get("present", True):
            rows.append(
                [esc(r["class"]), 0, r.get("predicted", 0), "absent", "absent", "absent", "–", "–", r.get("fp")]
            )
            continue
        rows.append(
            [
                esc(r["class"]),
                r["support"],
                r.get("predicted", ""),
                *(_with_ci(r, name) for name in ("precision", "recall", "f1")),
                fmt(r.get("auc")),
                r.get("fn"),
                r.get("fp"),
            ]
        )
    cols = ["class", "images", "predicted", "precision", "recall = class accuracy", "F1", "ROC AUC", "FN", "FP"]
    parts.append(f"<{h}>Per class</{h}>" + table_html(pd.DataFrame(rows, columns=cols)))
    figs = [
        file_img(d / "confusion_matrix.png", "confusion matrix", "confusion matrix (colour = share of the true class)"),
        file_img(d / "reliability.png", "reliability diagram", "calibration: accuracy vs confidence"),
        file_img(d / "roc.png", "ROC curves", "one-vs-rest ROC curves"),
    ]
    parts.append(f"<{h}>Figures</{h}><div class='figs'>{''.join(f for f in figs if f)}</div>")
    if gallery:
        g = _error_gallery(d / "predictions.csv")
        if g:
            parts.append(f"<{h}>Most confident mistakes</{h}>{g}")
    if doc.get("skipped"):
        sk = pd.DataFrame([[esc(s["path"]), esc(s["reason"])] for s in doc["skipped"]], columns=["path", "reason"])
        parts.append(f"<{h}>Skipped files</{h}>" + table_html(sk))
    parts.append(
        "<p class='meta'>Files: "
        + ", ".join(f"<code>{esc(v)}</code>" for v in sorted(set(doc.get("files", {}).values())))
        + "</p>"
    )
    return "\n".join(parts)


def write_eval_report(eval_dir: Path, out: Path | None = None) -> Path:
    """``<eval_dir>/report.html`` (or ``out``) from the evaluation's files."""
    d = Path(eval_dir)
    doc = load_eval_doc(d)
    title = f"Evaluation — {Path(doc.get('run_dir') or doc.get('bundle') or d).name} on {doc.get('prefix')}"
    head = (
        f"<h1>{esc(title)}</h1><p class='meta'>model <code>{esc(doc.get('bundle'))}</code>"
        + (f" · run <code>{esc(doc['run_id'])}</code>" if doc.get("run_id") else "")
        + "</p>"
    )
    path = Path(out) if out else d / EVAL_REPORT
    path.write_text(page(title, head + eval_section_html(d)))
    return path


# --------------------------------------------------------------------------------------------- compare report


def write_compare_report(r: CompareResult, path: Path) -> Path:
    p = r.baseline.prefix
    b, c = r.baseline, r.challenger
    parts = [
        "<h1>Baseline vs challenger</h1>",
        f"<p class='meta'>baseline <code>{esc(b.run_dir or b.bundle_dir)}</code><br>challenger "
        f"<code>{esc(c.run_dir or c.bundle_dir)}</code><br>n = {r.n} paired images from {esc(b.data_source)}</p>",
        f"<div class='{'ok' if r.significant else 'warn'}'><b>Verdict:</b> {esc(r.verdict)}</div>",
    ]
    names = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_macro", "ece", "nll"]
    costly = _costly_class(b.classes)
    names += [f"recall_{x}" for x in ([costly] if costly else []) + [x for x in b.classes if x != costly]]
    rows = []
    for n_ in names:
        key = f"{p}/{n_}"
        if key not in b.metrics and key not in c.metrics:
            continue
        vb, vc = b.metrics.get(key, math.nan), c.metrics.get(key, math.nan)
        rows.append(
            [
                esc(n_),
                f"{fmt(vb)} <span class='meta'>{fmt_ci(b.ci.get(key))}</span>",
                f"{fmt(vc)} <span class='meta'>{fmt_ci(c.ci.get(key))}</span>",
                f"{vc - vb:+.3f}" if math.isfinite(vb) and math.isfinite(vc) else "–",
            ]
        )
    parts.append("<h2>Metrics</h2>" + table_html(pd.DataFrame(rows, columns=["metric", "baseline", "challenger", "Δ"])))
    mc = r.mcnemar
    parts.append(
        "<h2>Paired tests</h2>"
        + table_html(
            pd.DataFrame(
                [
                    [
                        "both right",
                        int((b.predictions["correct"].to_numpy() & c.predictions["correct"].to_numpy()).sum()),
                    ]
                    if len(b.predictions) == len(c.predictions)
                    else ["both right", "–"],
                    ["only baseline right (b)", mc.b],
                    ["only challenger right (c)", mc.c],
                    ["McNemar exact p (two-sided)", f"{mc.p_exact:.4g}"],
                    ["McNemar mid-p", f"{mc.p_midp:.4g}"],
                    ["McNemar χ² (continuity-corrected) p", f"{mc.p_chi2:.4g}"],
                    [
                        "accuracy difference (challenger − baseline)",
                        f"{r.accuracy_diff * 100:+.1f} pt {_pt_ci(r.accuracy_diff_ci)}",
                    ],
                    ["macro-F1 difference", f"{r.f1_diff * 100:+.1f} pt {_pt_ci(r.f1_diff_ci)}"],
                ],
                columns=["", "value"],
            )
        )
    )
    parts.append(
        "<h2>Errors per class</h2><p class='meta'>False negatives of "
        f"{esc(costly or b.classes[0])} first: a missed case is the costly error.</p>"
        + table_html(r.errors.rename(columns=lambda x: x.replace("_", " ")))
    )
    parts.append("<h2>Confusion matrices</h2>" + file_img(r.out_dir / "confusion_matrices.png", "confusion matrices"))
    if r.attention is not None:
        att = r.attention.copy()
        att["baseline"] = att["baseline"].map(fmt)
        att["challenger"] = att["challenger"].map(fmt)
        parts.append("<h2>Where the models look (explanations)</h2>" + table_html(att))
    parts.append(
        "<p class='meta'>Full evaluations: <a href='baseline/report.html'>baseline</a> · "
        "<a href='challenger/report.html'>challenger</a></p>"
    )
    path = Path(path)
    path.write_text(page("cxrlab comparison", "\n".join(parts)))
    return path


def _pt_ci(ci: tuple[float, float]) -> str:
    if not all(math.isfinite(v) for v in ci):
        return ""
    return f"[{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]"


# --------------------------------------------------------------------------------------------- run report


def _latest_eval_dirs(run_dir: Path) -> list[Path]:
    ds = [d for d in run_dir.glob("eval-*") if (d / "metrics.json").is_file()]
    order = {"eval-test": 0, "eval-val": 1}
    return sorted(ds, key=lambda d: (order.get(d.name, 2), d.name))


def _audit_section(audit_dir: Path | None) -> str:
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
    parts = ["<h2>Data audit</h2>"]
    conf = doc.get("confound") if isinstance(doc.get("confound"), dict) else {}
    warnings = doc.get("warnings") or []
    if conf:
        score = conf.get("score", conf.get("balanced_accuracy", conf.get("accuracy")))
        chance = conf.get("chance")
        parts.append(
            f"<p>Confound score (trivial image statistics predicting the label, cross-validated): <b>{fmt(score)}</b>"
            + (f" vs chance {fmt(chance)}" if chance is not None else "")
            + ".</p>"
        )
    for w in warnings if isinstance(warnings, list) else [warnings]:
        parts.append(f"<div class='warn'>{esc(w)}</div>")
    html_path = a / "audit.html" if a.is_dir() else a.with_name("audit.html")
    if html_path.is_file():
        parts.append(f"<p><a href='{esc(_rel(html_path))}'>Full audit report</a></p>")
    return "\n".join(parts)


_REL_BASE: list[Path] = []


def _rel(target: Path) -> str:
    """``target`` relative to the page being written (links keep working when the folder moves)."""
    import os

    base = _REL_BASE[-1] if _REL_BASE else Path.cwd()
    try:
        return Path(os.path.relpath(Path(target).resolve(), base.resolve())).as_posix()
    except ValueError:
        return Path(target).resolve().as_uri()


def write_run_report(run_dir: Path, out: Path | None = None, audit_dir: Path | None = None) -> Path:
    """The report of a run: training curves, evaluation(s), calibration, audit summary, explanation link."""
    rd = Path(run_dir)
    if not rd.is_dir():
        raise ReportError(f"run directory not found: {rd}")
    summary: dict[str, Any] = {}
    if (rd / "summary.json").is_file():
        summary = json.loads((rd / "summary.json").read_text())
    elif not (rd / "metrics.csv").is_file() and not _latest_eval_dirs(rd):
        raise ReportError(f"{rd} is not a run directory (no summary.json, metrics.csv or eval-*/)")
    path = Path(out) if out else rd / RUN_REPORT
    if audit_dir is None:
        audit_dir = _find_pipeline_audit(rd)
    _REL_BASE.append(path.parent)
    try:
        run_id = summary.get("run_id") or rd.name
        parts = [f"<h1>Run {esc(run_id)}</h1>"]
        meta = []
        cfg = summary.get("config") if isinstance(summary.get("config"), dict) else {}
        if not cfg and (rd / "config.yaml").is_file():
            import yaml

            try:
                cfg = yaml.safe_load((rd / "config.yaml").read_text()) or {}
            except yaml.YAMLError:
                cfg = {}
        for k in ("model_name", "img_size", "batch_size", "optimizer", "learning_rate", "lr_scheduler", "epochs"):
            if k in cfg:
                meta.append(f"{k} <code>{esc(cfg[k])}</code>")
        for k in ("best_epoch", "epochs_run", "dataset_version"):
            if summary.get(k) is not None:
                meta.append(f"{k} <code>{esc(summary[k])}</code>")
        if summary.get("data"):
            meta.append(f"data <code>{esc(summary['data'])}</code>")
        parts.append(f"<p class='meta'>{' · '.join(meta)}</p>")
        parts.append(_audit_section(audit_dir))
        best = summary.get("best_epoch")
        curves = training_curves_figure(rd / "metrics.csv", int(best) if best is not None else None)
        if curves is not None:
            parts.append("<h2>Training</h2>" + fig_img(curves, "training curves", "per-epoch loss and scores"))
        for d in _latest_eval_dirs(rd):
            doc = load_eval_doc(d)
            parts.append(
                f"<h2>Evaluation: {esc(doc.get('prefix'))} ({esc(d.name)})</h2>"
                + eval_section_html(d, heading_level=3, gallery=d == _latest_eval_dirs(rd)[0])
                + f"<p class='meta'><a href='{esc(_rel(d / 'report.html'))}'>this evaluation on its own page</a></p>"
            )
        parts.append(_explain_section(rd))
        path.write_text(page(f"cxrlab run {run_id}", "\n".join(x for x in parts if x)))
    finally:
        _REL_BASE.pop()
    return path


def _explain_section(rd: Path) -> str:
    """Links to the run's explanation pages and their mean attention shares (from attention.json)."""
    explains = sorted(rd.glob("explain*/explain.html"), key=lambda p: p.stat().st_mtime)
    if not explains:
        return ""
    rows = []
    for e in explains:
        doc: dict[str, Any] = {}
        if (e.parent / "attention.json").is_file():
            try:
                doc = json.loads((e.parent / "attention.json").read_text())
            except json.JSONDecodeError:
                doc = {}
        s = doc.get("summary", {}) if isinstance(doc.get("summary"), dict) else {}
        rows.append(
            [
                f"<a href='{esc(_rel(e))}'>{esc(e.parent.name)}</a>",
                esc(doc.get("subset", "")),
                s.get("n_images", ""),
                fmt(s.get("in_lungs")),
                fmt(s.get("on_text")),
                fmt(s.get("on_border")),
            ]
        )
    cols = ["explanation", "images", "n", "attention in lungs", "attention on text", "attention on border"]
    return (
        "<h2>Explanations</h2><p class='meta'>Mean share of the Grad-CAM mass per region: a model that looks at "
        "text or the border instead of the lungs has learned a shortcut.</p>"
        + table_html(pd.DataFrame(rows, columns=cols))
    )


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
