"""The data audit's page (``audit.html``): counts, feature histograms per class, flagged-image galleries, near
duplicates and the confound check, built from what ``cxrlab.data.audit`` measured."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from cxrlab.data.audit import AuditConfig


def _hist_figure(feats: pd.DataFrame, classes: list[str]):
    from cxrlab.report import html as rh

    ok = feats[feats["error"] == ""]
    panels = [
        ("width", "width (px)", False),
        ("height", "height (px)", False),
        ("aspect", "aspect (w/h)", False),
        ("mean", "mean intensity", False),
        ("std", "intensity std", False),
        ("sharpness", "sharpness (var. of Laplacian)", True),
        ("text_score", "text/marker score", False),
        ("text_glyphs", "text glyphs per image", False),
    ]
    fig, axes = rh.new_figure(12, 6.2, 2, 4)
    for ax, (col, title, logx) in zip(np.ravel(axes), panels, strict=True):
        vals = ok[col].astype(float)
        if logx:
            vals = np.log10(vals.clip(lower=1e-3))
            title += " (log10)"
        lo, hi = float(vals.min()), float(vals.max())
        bins = np.linspace(lo, hi + 1e-9 if hi > lo else lo + 1, 31)
        for c in classes:
            v = vals[ok["label"] == c]
            if len(v):
                ax.hist(v, bins=bins, alpha=0.5, label=c, density=True)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
    np.ravel(axes)[0].legend(fontsize=8)
    return fig


def _counts_figure(counts: pd.DataFrame):
    from cxrlab.report import html as rh

    fig, ax = rh.new_figure(6, 3)
    x = np.arange(len(counts.index))
    width = 0.8 / max(1, len(counts.columns))
    for i, s in enumerate(counts.columns):
        ax.bar(x + i * width, counts[s].to_numpy(), width, label=str(s))
    ax.set_xticks(x + width * (len(counts.columns) - 1) / 2, [str(c) for c in counts.index])
    ax.set_ylabel("images")
    if len(counts.columns) > 1:
        ax.legend(fontsize=8)
    return fig


def _thumb(path: str, boxes: bool) -> str | None:
    import cv2

    from cxrlab.data.io import ImageReadError, read_xray
    from cxrlab.data.textdetect import detect_text
    from cxrlab.report import html as rh

    try:
        g = read_xray(path)
    except (ImageReadError, OSError):
        return None
    if not boxes:
        return rh.array_to_png_b64(g, 160)
    rgb = cv2.cvtColor(g, cv2.COLOR_GRAY2RGB)
    t = max(1, max(g.shape) // 128)
    for x, y, w, h in detect_text(g).boxes:
        cv2.rectangle(rgb, (x, y), (x + w, y + h), (255, 40, 40), t)
    return rh.array_to_png_b64(rgb, 160)


def _gallery_items(feats: pd.DataFrame, mask: pd.Series, n: int, caption_col: str, seed: int, boxes: bool):
    idx = feats.index[mask.to_numpy()]
    if len(idx) == 0 or n == 0:
        return []
    rng = np.random.default_rng(seed)
    # spread the examples over classes
    picks: list[int] = []
    by_class = {c: list(idx[feats.loc[idx, "label"] == c]) for c in sorted(feats.loc[idx, "label"].unique())}
    for c in by_class:
        rng.shuffle(by_class[c])
    while len(picks) < n and any(by_class.values()):
        for c in list(by_class):
            if by_class[c] and len(picks) < n:
                picks.append(by_class[c].pop())
    items = []
    for i in picks:
        r = feats.loc[i]
        b64 = _thumb(r["path"], boxes)
        if b64:
            val = r[caption_col]
            val = f"{val:.3g}" if isinstance(val, float) else str(val)
            items.append((b64, f"{r['label']} · {caption_col} {val} · {Path(r['path']).name}"))
    return items


def render_audit_page(
    cfg: AuditConfig,
    src: Path,
    kind: str,
    feats: pd.DataFrame,
    classes: list[str],
    counts: pd.DataFrame,
    per_class: dict,
    conf: dict,
    dup: pd.DataFrame,
    warnings: list[str],
    elapsed: float,
    *,
    flags: tuple[str, ...],
    sharp_size: int,
    confound_margin: float,
    src_audit: dict[str, Any] | None = None,
) -> str:
    """The audit page's HTML; ``flags``, ``sharp_size`` and ``confound_margin`` are the audit's definitions
    (``cxrlab.data.audit``), passed in so the page layer does not import the stage."""
    from cxrlab.report import html as rh

    src_audit = src_audit or {}
    ctab = counts.copy()
    ctab.insert(0, "class", ctab.index)
    confound = None
    if "all" in conf:
        rows = [{"features": "all trivial statistics", **_conf_row(conf["all"], classes)}]
        rows += [{"features": n, **_conf_row(g, classes)} for n, g in conf["groups"].items()]
        single = [
            {"feature": f, "balanced accuracy": v} for f, v in sorted(conf["features"].items(), key=lambda kv: -kv[1])
        ]
        confound = {
            "text": (
                f"Cross-validated ({conf['folds']}-fold, stratified, seed {conf['seed']}) prediction of the label "
                f"from trivial image statistics only. Chance: accuracy {conf['chance_accuracy']:.2f} (majority "
                f"class), balanced accuracy {conf['chance_balanced_accuracy']:.2f} (1/k). A group at or above "
                f"chance + {confound_margin} balanced accuracy is flagged."
            ),
            "groups": rh.table(rows, float_fmt="{:.3f}"),
            "single": rh.table(single, float_fmt="{:.3f}"),
        }
    pc_rows = []
    for c in classes:
        d = per_class[c]
        if d["n"] == 0:
            continue
        pc_rows.append(
            {
                "class": c,
                "images": d["n"],
                "width (median)": d["width"]["median"],
                "height (median)": d["height"]["median"],
                "aspect (median)": d["aspect"]["median"],
                "mean intensity (median)": d["mean"]["median"],
                "sharpness (median)": d["sharpness"]["median"],
                "text share": d["text_share"],
                ">=2 glyphs share": d["text_multi_share"],
                "glyphs / image": d["text_glyphs_mean"],
            }
        )
    frows = []
    for c in classes:
        g = feats[feats["label"] == c]
        frows.append({"class": c, **{f: round(float(g[f"flag_{f}"].mean()), 4) if len(g) else 0.0 for f in flags}})
    galleries = []
    for flag, col, boxes in _GALLERIES:
        m = feats[f"flag_{flag}"]
        if m.any():
            items = _gallery_items(feats, m, cfg.gallery_per_flag, col, cfg.seed, boxes)
            galleries.append({"title": f"{flag} ({int(m.sum())} images)", "thumbs": items})
    dsum = {
        "exact pairs": int((dup["kind"] == "exact").sum()),
        f"near pairs (pHash <= {cfg.near_dup_threshold} bits)": int((dup["kind"] == "near").sum()),
        "pairs across splits": int(dup["cross_split"].sum()),
        "pairs with different labels": int(dup["cross_label"].sum()),
    }
    bad = feats[feats["error"] != ""]
    thr = {
        "blur": f"sharpness < {cfg.blur_threshold} (Laplacian variance at {sharp_size}x{sharp_size})",
        "underexposed": f"mean intensity < {cfg.dark_mean}",
        "overexposed": f"mean intensity > {cfg.bright_mean}",
        "low_contrast": f"intensity std < {cfg.low_contrast_std}",
        "text": "at least one glyph scored >= 0.5 by cxrlab.data.textdetect",
        "near duplicate": f"pHash Hamming distance <= {cfg.near_dup_threshold}",
    }
    shown = set(conf.get("warnings", [])) | set(src_audit.get("warnings", []))
    return rh.render(
        "audit.html",
        title="Data audit",
        subtitle=f"{src} · {len(feats):,} images",
        source_warnings=src_audit.get("warnings", []),
        confound_warnings=conf.get("warnings", []),
        other_warnings=[w for w in warnings if w not in shown],
        all_clear=not warnings and not conf.get("warnings"),
        facts=rh.pairs(
            {
                "data": str(src),
                "kind": kind,
                "images": f"{len(feats):,} ({int((feats['error'] != '').sum())} unreadable)",
                "classes": ", ".join(classes),
                "audit time": f"{elapsed:.1f} s",
            }
        ),
        counts=rh.table(ctab.reset_index(drop=True)),
        counts_figure=rh.figure(_counts_figure(counts)),
        sources=_sources_context(src_audit, classes) if src_audit.get("table") else None,
        confound=confound,
        confound_skipped=conf.get("skipped", ""),
        histograms=rh.figure(_hist_figure(feats, classes), dpi=90),
        per_class=rh.table(pc_rows, float_fmt="{:.3g}"),
        flag_shares=rh.table(frows, float_fmt="{:.3f}"),
        galleries=galleries,
        duplicates=rh.pairs(dsum),
        duplicate_pairs=_duplicate_pairs(dup),
        unreadable=rh.table(bad[["path", "label", "error"]], max_rows=100) if len(bad) else None,
        thresholds=rh.pairs(thr),
    )


def _duplicate_pairs(dup: pd.DataFrame) -> Any:
    """The pairs, those across splits and labels first (None when there is none)."""
    from cxrlab.report import html as rh

    if not len(dup):
        return None
    order = dup.sort_values(["cross_split", "cross_label", "kind"], ascending=[False, False, True])
    return rh.table(order, max_rows=50)


# the flag galleries: (flag, the feature in the caption, draw the detected text boxes)
_GALLERIES = [
    ("text", "text_glyphs", True),
    ("blur", "sharpness", False),
    ("underexposed", "mean", False),
    ("overexposed", "mean", False),
    ("low_contrast", "std", False),
]


def _sources_context(sa: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    from cxrlab.report import html as rh

    rows = [{"source": s, **row, "total": sum(row.values())} for s, row in sa["table"].items()]
    spc = sa.get("source_predicts_class")
    text = ""
    if spc:
        rec = ", ".join(f"{c} {v:.2f}" for c, v in spc["recall"].items())
        text = (
            f"The source alone ({spc['rule']}) predicts the class with accuracy {spc['accuracy']:.2f}, balanced "
            f"accuracy {spc['balanced_accuracy']:.2f} (chance {spc['chance_balanced_accuracy']:.2f}), recall "
            f"{rec}; Cramer's V {spc['cramers_v']:.2f}."
        )
    within = [
        {"source": s, "classes": ", ".join(c["all"]["recall"]), **_conf_row(c["all"], list(c["all"]["recall"]))}
        for s, c in sa.get("per_source_confound", {}).items()
        if "all" in c
    ]
    return {
        "table": rh.table(rows),
        "predicts": text,
        "within": rh.table([{k: v for k, v in r.items() if not k.startswith("recall")} for r in within])
        if within
        else None,
    }


def _conf_row(g: dict, classes: list[str]) -> dict[str, Any]:
    row = {"accuracy": g["accuracy"], "balanced accuracy": g["balanced_accuracy"]}
    for c in classes:
        row[f"recall {c}"] = g["recall"][c]
    return row
