"""Data audit (``cxrlab data audit``): the seed's "Data Analysis", measured instead of eyeballed.

For a manifest or a split, every image is decoded once (process pool, progress bar) and measured: size,
aspect ratio, intensity (mean, spread, dark/bright pixel shares), sharpness (variance of the Laplacian
after resizing to ``SHARP_SIZE`` square, so it compares across resolutions), burned-in text / markers
(:mod:`cxrlab.data.textdetect`), sha256 and pHash. From those:

- counts per class (and split), per-class distributions, quality flags (blur, under/over-exposure, low
  contrast, text, unreadable) with the share of each class flagged;
- exact (sha256) and near (pHash) duplicates, within and across splits and labels;
- the **confound score**: cross-validated (stratified 5-fold, seeded) accuracy and balanced accuracy of a
  gradient-boosting classifier that sees only these trivial statistics, overall and per feature group
  (size/aspect, intensity, sharpness, text), against chance (majority share; 1/k). A group that reaches
  ``chance + CONFOUND_MARGIN`` balanced accuracy gets a plain warning: a model can learn the source of the
  images instead of the disease.

Outputs in ``out``: ``audit_features.csv`` (one row per image, flag_* columns that ``split
--exclude-flagged`` reads), ``duplicates.csv``, ``audit.json`` (summary) and ``audit.html`` (self-contained:
warnings first, then counts, confound, distributions, text, flags with a gallery, duplicates).

Flag thresholds are absolute so they mean the same on every data set (defaults below; measured on cxr-full,
the median sharpness is 262 for COVID19, 88 for NORMAL and 60 for PNEUMONIA, mean intensity 122-141).

Cost: one decode per image in the pool (~7 ms CPU per image for all measurements, text detection included);
the HTML gallery re-reads only the few dozen thumbnails it shows. Measured on cxr-full (6,378 images,
benchmarks/bench_split_audit.py): 56 s CPU in all, i.e. about 30 s of wall time on 2 idle cores.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from cxrlab.atomic import write_json
from cxrlab.config import StrictModel
from cxrlab.data.manifest import MANIFEST_FILE, SPLIT_FILE, SPLIT_META_FILE, SPLITS, DataError, read_manifest
from cxrlab.data.parallel import map_files
from cxrlab.data.split import (
    AUDIT_FEATURES_FILE,
    DEFAULT_NEAR_DUP_THRESHOLD,
    image_phash,
    near_duplicate_pairs,
    phash_to_int,
)

AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"
DUPLICATES_FILE = "duplicates.csv"
SHARP_SIZE = 256  # sharpness is measured after resizing to this square
CONFOUND_MARGIN = 0.2  # warn when a feature group's balanced accuracy is this far above 1/k
FLAGS = ("unreadable", "blur", "underexposed", "overexposed", "low_contrast", "text", "duplicate")
FEATURE_GROUPS: dict[str, list[str]] = {
    "image size/aspect": ["width", "height", "aspect"],
    "intensity/exposure": ["mean", "std", "dark_frac", "bright_frac"],
    "sharpness": ["log_sharpness"],
    "burned-in text/markers": ["text_score", "text_glyphs"],
}


class AuditConfig(StrictModel):
    """What to audit and the flag thresholds. ``data``: manifest.csv / split.csv or a folder holding one."""

    data: Path
    out: Path
    workers: int = Field(2, ge=0, description="decoder processes (0 or 1 = in-process)")
    seed: int = 0
    near_dup_threshold: int = Field(DEFAULT_NEAR_DUP_THRESHOLD, ge=-1, le=64, description="pHash bits; -1 = off")
    blur_threshold: float = Field(20.0, ge=0, description="flag blur below this Laplacian variance (256 px)")
    dark_mean: float = Field(70.0, ge=0, le=255, description="flag underexposed (too dark) below this mean")
    bright_mean: float = Field(185.0, ge=0, le=255, description="flag overexposed (washed out) above this mean")
    low_contrast_std: float = Field(20.0, ge=0, description="flag low contrast below this grey-level std")
    cv_folds: int = Field(5, ge=2)
    gallery_per_flag: int = Field(12, ge=0, description="thumbnails per flag in audit.html")
    progress: bool = True


@dataclass
class AuditResult:
    out: Path
    json_path: Path
    html_path: Path
    features_path: Path
    duplicates_path: Path
    n_images: int
    n_unreadable: int
    classes: list[str]
    counts: dict[str, dict[str, int]]  # class -> split ("all" for a manifest) -> images
    text_share: dict[str, float]  # class -> share of images with text/markers
    flag_share: dict[str, dict[str, float]]  # flag -> class -> share
    confound: dict[str, Any]
    duplicates: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


# -------------------------------------------------------------------------------------------- measuring


def _load(data: Path) -> tuple[pd.DataFrame, str, Path]:
    """(table with path/label/split..., kind "split"|"manifest", file read)."""
    p = Path(data)
    if p.is_dir():
        if (p / SPLIT_FILE).is_file():
            p = p / SPLIT_FILE
        elif (p / MANIFEST_FILE).is_file():
            p = p / MANIFEST_FILE
        else:
            raise DataError(f"{p} holds neither {SPLIT_FILE} nor {MANIFEST_FILE}; pass a manifest or split folder")
    df = read_manifest(p)
    if len(df) == 0:
        raise DataError(f"{p} lists no images; nothing to audit")
    kind = "split" if "split" in df.columns else "manifest"
    if kind == "manifest":
        df["split"] = ""
    df["label"] = df["label"].astype(str)
    df["split"] = df["split"].astype(str)
    return df.reset_index(drop=True), kind, p


def measure_image(gray: np.ndarray) -> dict[str, float]:
    """The trivial statistics of one 2-D uint8 image (no flags): size, intensity, sharpness, text."""
    import cv2

    from cxrlab.data.textdetect import detect_text

    h, w = gray.shape
    mean, std = cv2.meanStdDev(gray)
    small = cv2.resize(gray, (SHARP_SIZE, SHARP_SIZE), interpolation=cv2.INTER_AREA)
    sharp = float(cv2.Laplacian(small, cv2.CV_64F).var())
    det = detect_text(gray)
    n = float(gray.size)
    return {
        "width": int(w),
        "height": int(h),
        "aspect": round(w / h, 4),
        "mean": round(float(mean[0, 0]), 3),
        "std": round(float(std[0, 0]), 3),
        "dark_frac": round(float(np.count_nonzero(gray < 16)) / n, 5),
        "bright_frac": round(float(np.count_nonzero(gray > 239)) / n, 5),
        "sharpness": round(sharp, 3),
        "text_score": float(det.score),
        "text_glyphs": len(det.boxes),
        "text_area": round(float(det.mask.mean()), 5),
    }


def _measure_path(path: str) -> dict[str, Any]:
    """Worker: read one file once -> sha256, pHash and :func:`measure_image`, or the read error."""
    from cxrlab.data.io import ImageReadError, decode_xray

    try:
        with open(path, "rb") as f:
            data = f.read()
        img, _ = decode_xray(data, path, "uint8")
    except ImageReadError as e:
        return {"path": path, "error": e.reason}
    except OSError as e:
        return {"path": path, "error": f"cannot open: {e.strerror or e}"}
    out: dict[str, Any] = {"path": path, "error": ""}
    out["sha256_file"] = hashlib.sha256(data).hexdigest()
    out["phash_img"] = image_phash(img)
    out.update(measure_image(img))
    return out


def _run(paths: list[str], workers: int, progress: bool) -> list[dict[str, Any]]:
    return map_files(_measure_path, paths, workers, "audit", progress)


def _flags(feats: pd.DataFrame, cfg: AuditConfig) -> pd.DataFrame:
    ok = feats["error"] == ""
    f = pd.DataFrame(index=feats.index)
    f["flag_unreadable"] = ~ok
    f["flag_blur"] = ok & (feats["sharpness"] < cfg.blur_threshold)
    f["flag_underexposed"] = ok & (feats["mean"] < cfg.dark_mean)
    f["flag_overexposed"] = ok & (feats["mean"] > cfg.bright_mean)
    f["flag_low_contrast"] = ok & (feats["std"] < cfg.low_contrast_std)
    f["flag_text"] = ok & (feats["text_glyphs"] > 0)
    return f


# ------------------------------------------------------------------------------------------- duplicates


def _duplicates(feats: pd.DataFrame, threshold: int) -> pd.DataFrame:
    """Exact (sha256) and near (pHash) duplicate pairs with their labels and splits."""
    cols = ["kind", "distance", "path_a", "path_b", "label_a", "label_b", "split_a", "split_b"]
    ok = feats[feats["error"] == ""]
    rows: list[tuple] = []
    for _, g in ok.groupby("sha256", sort=True):
        if len(g) > 1:
            first = g.iloc[0]
            for _, r in g.iloc[1:].iterrows():
                rows.append(
                    ("exact", 0, first["path"], r["path"], first["label"], r["label"], first["split"], r["split"])
                )
    if threshold >= 0 and len(ok) > 1:
        valid = ok[ok["phash"].str.fullmatch(r"[0-9a-fA-F]{16}")]
        h = phash_to_int(valid["phash"])
        ii, jj = near_duplicate_pairs(h, threshold)
        sha = valid["sha256"].to_numpy(dtype=object)
        d = np.bitwise_count(h[ii] ^ h[jj]) if len(ii) else np.zeros(0, int)
        for i, j, dist in zip(ii, jj, d, strict=True):
            if sha[i] == sha[j]:
                continue  # already an exact pair
            a, b = valid.iloc[i], valid.iloc[j]
            rows.append(("near", int(dist), a["path"], b["path"], a["label"], b["label"], a["split"], b["split"]))
    dup = pd.DataFrame(rows, columns=cols)
    dup["cross_split"] = (dup["split_a"] != dup["split_b"]) & (dup["split_a"] != "") & (dup["split_b"] != "")
    dup["cross_label"] = dup["label_a"] != dup["label_b"]
    return dup


# --------------------------------------------------------------------------------------------- confound


def _cv_predict(x: np.ndarray, y: np.ndarray, folds: int, seed: int, model: str) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.tree import DecisionTreeClassifier
    from threadpoolctl import threadpool_limits

    if model == "gbm":
        clf = HistGradientBoostingClassifier(
            max_iter=40, learning_rate=0.15, min_samples_leaf=5, early_stopping=False, random_state=seed
        )
    else:
        clf = DecisionTreeClassifier(max_depth=4, min_samples_leaf=5, random_state=seed)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # one OpenMP thread: the data are tiny, and on a busy machine HistGradientBoosting's thread team is
    # ~100x slower than a single thread (measured: 55 s vs 0.6 s for 1,500 rows at load 13 on 2 cores)
    with threadpool_limits(limits=1):
        return cross_val_predict(clf, x, y, cv=cv)


def confound_score(feats: pd.DataFrame, classes: list[str], folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """How well trivial image statistics alone predict the label (cross-validated), vs chance.

    Returns ``{"all": {...}, "groups": {name: {...}}, "features": {name: balanced_accuracy}, "chance_*",
    "warnings": [...]}``; each entry holds accuracy, balanced_accuracy and per-class recall. Skipped (with a
    reason) when a class has fewer images than folds or there is one class.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score

    ok = feats[feats["error"] == ""].copy()
    ok["log_sharpness"] = np.log1p(ok["sharpness"].astype(float))
    y = ok["label"].to_numpy(dtype=object)
    counts = pd.Series(y).value_counts()
    k = len(classes)
    res: dict[str, Any] = {
        "n": int(len(ok)),
        "folds": folds,
        "seed": seed,
        "model": "HistGradientBoostingClassifier (groups, all); DecisionTree depth 4 (single features)",
        "chance_accuracy": round(float(counts.max() / max(1, len(y))), 4) if len(y) else 0.0,
        "chance_balanced_accuracy": round(1.0 / max(k, 1), 4),
        "margin": CONFOUND_MARGIN,
        "groups": {},
        "features": {},
        "warnings": [],
    }
    if k < 2 or counts.min() < 2:
        res["skipped"] = "needs at least two classes with two readable images each"
        return res
    folds = int(min(folds, counts.min()))
    res["folds"] = folds

    def score(cols: list[str], model: str) -> dict[str, Any]:
        pred = _cv_predict(ok[cols].to_numpy(dtype=float), y, folds, seed, model)
        rec = recall_score(y, pred, labels=classes, average=None, zero_division=0)
        return {
            "accuracy": round(float(accuracy_score(y, pred)), 4),
            "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 4),
            "recall": {c: round(float(r), 4) for c, r in zip(classes, rec, strict=True)},
            "features": cols,
        }

    all_cols = [c for cols in FEATURE_GROUPS.values() for c in cols]
    res["all"] = score(all_cols, "gbm")
    for name, cols in FEATURE_GROUPS.items():
        res["groups"][name] = score(cols, "gbm")
    for c in all_cols:
        res["features"][c] = score([c], "tree")["balanced_accuracy"]
    chance = res["chance_balanced_accuracy"]
    flagged = []
    for name, g in sorted(res["groups"].items(), key=lambda kv: -kv[1]["balanced_accuracy"]):
        if g["balanced_accuracy"] >= chance + CONFOUND_MARGIN:
            best = max(g["recall"], key=g["recall"].get)
            flagged.append(
                f"{name} alone predicts the class with {g['balanced_accuracy']:.2f} balanced accuracy "
                f"(chance {chance:.2f}; it recognises {best} with recall {g['recall'][best]:.2f}): "
                "the model can learn the source, not the disease"
            )
    if res["all"]["balanced_accuracy"] >= chance + CONFOUND_MARGIN and not flagged:
        flagged.append(
            f"trivial image statistics together predict the class with {res['all']['balanced_accuracy']:.2f} "
            f"balanced accuracy (chance {chance:.2f}): the model can learn the source, not the disease"
        )
    if flagged:
        a = res["all"]
        flagged.insert(
            0,
            f"confound score: trivial image statistics (size, aspect, intensity, sharpness, text) predict the class "
            f"with {a['balanced_accuracy']:.2f} balanced accuracy (chance {chance:.2f}), {a['accuracy']:.2f} accuracy "
            f"(majority {res['chance_accuracy']:.2f})",
        )
    res["warnings"] = flagged
    res["confounded"] = bool(flagged)
    return res


# ----------------------------------------------------------------------------------------------- report


def _per_class(feats: pd.DataFrame, classes: list[str]) -> dict[str, dict[str, Any]]:
    ok = feats[feats["error"] == ""]
    out: dict[str, dict[str, Any]] = {}
    for c in classes:
        g = ok[ok["label"] == c]
        d: dict[str, Any] = {"n": int(len(g))}
        for col in ("width", "height", "aspect", "mean", "std", "sharpness", "text_score", "text_glyphs"):
            if len(g):
                q = g[col].astype(float).quantile([0.05, 0.5, 0.95]).to_numpy()
                d[col] = {"p05": round(float(q[0]), 3), "median": round(float(q[1]), 3), "p95": round(float(q[2]), 3)}
        d["text_share"] = round(float((g["text_glyphs"] > 0).mean()), 4) if len(g) else 0.0
        # more than one glyph: text beyond a lone laterality letter (words, panel letters + marker, arrows)
        d["text_multi_share"] = round(float((g["text_glyphs"] >= 2).mean()), 4) if len(g) else 0.0
        d["text_glyphs_mean"] = round(float(g["text_glyphs"].mean()), 3) if len(g) else 0.0
        out[c] = d
    return out


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


def _html(
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
) -> str:
    from cxrlab.report import html as rh

    parts: list[str] = []
    for w in conf.get("warnings", []):
        parts.append(rh.callout(w, "error", "Confound:"))
    for w in warnings:
        if w not in conf.get("warnings", []):
            parts.append(rh.callout(w, "warn"))
    if not warnings and not conf.get("warnings"):
        parts.append(rh.callout("no confound, duplicate or quality warnings", "ok"))
    parts.append(
        rh.kv(
            {
                "data": str(src),
                "kind": kind,
                "images": f"{len(feats):,} ({int((feats['error'] != '').sum())} unreadable)",
                "classes": ", ".join(classes),
                "audit time": f"{elapsed:.1f} s",
            }
        )
    )
    ctab = counts.copy()
    ctab.insert(0, "class", ctab.index)
    parts.append(rh.section("Counts", rh.table(ctab.reset_index(drop=True)), rh.figure_tag(_counts_figure(counts))))

    # confound
    if "all" in conf:
        rows = [{"features": "all trivial statistics", **_conf_row(conf["all"], classes)}]
        rows += [{"features": n, **_conf_row(g, classes)} for n, g in conf["groups"].items()]
        single = [
            {"feature": f, "balanced accuracy": v} for f, v in sorted(conf["features"].items(), key=lambda kv: -kv[1])
        ]
        parts.append(
            rh.section(
                "Confound score",
                rh.paragraph(
                    f"Cross-validated ({conf['folds']}-fold, stratified, seed {conf['seed']}) prediction of the label "
                    f"from trivial image statistics only. Chance: accuracy {conf['chance_accuracy']:.2f} (majority "
                    f"class), balanced accuracy {conf['chance_balanced_accuracy']:.2f} (1/k). A group at or above "
                    f"chance + {CONFOUND_MARGIN} balanced accuracy is flagged."
                ),
                rh.table(rows, float_fmt="{:.3f}"),
                rh.section("Single features (depth-4 tree)", rh.table(single, float_fmt="{:.3f}"), level=3),
            )
        )
    else:
        parts.append(rh.section("Confound score", rh.paragraph(f"skipped: {conf.get('skipped', '')}")))

    parts.append(rh.section("Distributions per class", rh.figure_tag(_hist_figure(feats, classes), dpi=90)))
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
    parts.append(rh.section("Per-class summary", rh.table(pc_rows, float_fmt="{:.3g}")))

    # flags
    frows = []
    for c in classes:
        g = feats[feats["label"] == c]
        frows.append({"class": c, **{f: round(float(g[f"flag_{f}"].mean()), 4) if len(g) else 0.0 for f in FLAGS}})
    flag_parts = [rh.paragraph("Share of each class flagged."), rh.table(frows, float_fmt="{:.3f}")]
    gal = [
        ("text", "text_glyphs", True),
        ("blur", "sharpness", False),
        ("underexposed", "mean", False),
        ("overexposed", "mean", False),
        ("low_contrast", "std", False),
    ]
    for flag, col, boxes in gal:
        m = feats[f"flag_{flag}"]
        if m.any():
            items = _gallery_items(feats, m, cfg.gallery_per_flag, col, cfg.seed, boxes)
            flag_parts.append(rh.section(f"{flag} ({int(m.sum())} images)", rh.gallery(items), level=3))
    parts.append(rh.section("Quality and text flags", *flag_parts))

    # duplicates
    dsum = {
        "exact pairs": int((dup["kind"] == "exact").sum()),
        f"near pairs (pHash <= {cfg.near_dup_threshold} bits)": int((dup["kind"] == "near").sum()),
        "pairs across splits": int(dup["cross_split"].sum()),
        "pairs with different labels": int(dup["cross_label"].sum()),
    }
    dparts = [rh.kv(dsum)]
    if len(dup):
        show = dup.sort_values(["cross_split", "cross_label", "kind"], ascending=[False, False, True])
        dparts.append(rh.table(show, max_rows=50))
    parts.append(rh.section("Duplicates", *dparts))
    bad = feats[feats["error"] != ""]
    if len(bad):
        parts.append(rh.section("Unreadable files", rh.table(bad[["path", "label", "error"]], max_rows=100)))
    thr = {
        "blur": f"sharpness < {cfg.blur_threshold} (Laplacian variance at {SHARP_SIZE}x{SHARP_SIZE})",
        "underexposed": f"mean intensity < {cfg.dark_mean}",
        "overexposed": f"mean intensity > {cfg.bright_mean}",
        "low_contrast": f"intensity std < {cfg.low_contrast_std}",
        "text": "at least one glyph scored >= 0.5 by cxrlab.data.textdetect",
        "near duplicate": f"pHash Hamming distance <= {cfg.near_dup_threshold}",
    }
    parts.append(rh.section("Thresholds", rh.kv(thr)))
    return rh.page("Data audit", parts, subtitle=f"{src} · {len(feats):,} images")


def _conf_row(g: dict, classes: list[str]) -> dict[str, Any]:
    row = {"accuracy": g["accuracy"], "balanced accuracy": g["balanced_accuracy"]}
    for c in classes:
        row[f"recall {c}"] = g["recall"][c]
    return row


# ------------------------------------------------------------------------------------------------ audit


def audit(cfg: AuditConfig) -> AuditResult:
    """Measure every image of a manifest or split; write audit_features.csv, duplicates.csv, audit.json and
    audit.html into ``cfg.out``. Unreadable images are listed (flag_unreadable, error) and the rest goes on."""
    t0 = time.perf_counter()
    df, kind, src = _load(Path(cfg.data))
    if df["path"].duplicated().any():
        raise DataError(f"{src} lists {df.loc[df['path'].duplicated(), 'path'].iloc[0]} more than once")
    results = _run(df["path"].astype(str).tolist(), cfg.workers, cfg.progress)
    m = pd.DataFrame(results)
    num_cols = [
        "width", "height", "aspect", "mean", "std", "dark_frac", "bright_frac", "sharpness",
        "text_score", "text_glyphs", "text_area",
    ]  # fmt: skip
    for c in num_cols + ["sha256_file", "phash_img"]:
        if c not in m.columns:
            m[c] = np.nan if c in num_cols else ""
    feats = pd.DataFrame({"path": df["path"].astype(str), "label": df["label"], "split": df["split"]})
    feats = feats.merge(m, on="path", how="left")
    feats["error"] = feats["error"].fillna("").astype(str)
    feats["text_glyphs"] = feats["text_glyphs"].fillna(0).astype(int)
    man_sha = df["sha256"].astype(str) if "sha256" in df.columns else pd.Series([""] * len(df))
    man_ph = df["phash"].astype(str) if "phash" in df.columns else pd.Series([""] * len(df))
    feats["sha256"] = np.where(feats["sha256_file"].fillna("").astype(str) != "", feats["sha256_file"], man_sha)
    valid_ph = man_ph.str.fullmatch(r"[0-9a-fA-F]{16}").to_numpy()
    # the manifest's pHash when present, so audit and split agree on near duplicates
    feats["phash"] = np.where(valid_ph, man_ph, feats["phash_img"].fillna("").astype(str))
    feats = feats.drop(columns=["sha256_file", "phash_img"])
    feats = pd.concat([feats, _flags(feats, cfg)], axis=1)
    dup = _duplicates(feats, cfg.near_dup_threshold)
    dup_paths = set(dup["path_a"]) | set(dup["path_b"])
    feats["flag_duplicate"] = feats["path"].isin(dup_paths)
    feats["flags"] = [
        ";".join(f for f in FLAGS if row[f"flag_{f}"]) for _, row in feats[[f"flag_{f}" for f in FLAGS]].iterrows()
    ]

    classes = sorted(feats["label"].unique())
    split_names = [s for s in SPLITS if (feats["split"] == s).any()] + sorted(
        {s for s in feats["split"].unique() if s not in SPLITS and s != ""}
    )
    if split_names:
        counts_df = pd.crosstab(feats["label"], feats["split"]).reindex(
            index=classes, columns=split_names, fill_value=0
        )
        counts_df["all"] = counts_df.sum(axis=1)
    else:
        counts_df = feats.groupby("label").size().reindex(classes).to_frame("all")
    counts = {c: {s: int(counts_df.loc[c, s]) for s in counts_df.columns} for c in classes}

    conf = confound_score(feats, classes, cfg.cv_folds, cfg.seed)
    per_class = _per_class(feats, classes)
    flag_share = {
        f: {c: round(float(feats.loc[feats["label"] == c, f"flag_{f}"].mean()), 4) for c in classes} for f in FLAGS
    }
    text_share = {c: per_class[c]["text_share"] for c in classes}

    warnings: list[str] = list(conf.get("warnings", []))
    ts = [v for v in text_share.values()]
    if len(ts) > 1 and max(ts) - min(ts) >= 0.25:
        hi = max(text_share, key=text_share.get)
        lo = min(text_share, key=text_share.get)
        warnings.append(
            f"burned-in text/markers differ by class: {text_share[hi]:.0%} of {hi} vs {text_share[lo]:.0%} of {lo} "
            "images (consider preprocess text_removal and check Grad-CAM for attention on text)"
        )
    multi = {c: per_class[c]["text_multi_share"] for c in classes}
    if len(multi) > 1 and max(multi.values()) - min(multi.values()) >= 0.2:
        hi = max(multi, key=multi.get)
        lo = min(multi, key=multi.get)
        warnings.append(
            f"text beyond a lone marker letter (2+ glyphs: words, panel letters, arrows) differs by class: "
            f"{multi[hi]:.0%} of {hi} vs {multi[lo]:.0%} of {lo} images"
        )
    n_cross = int(dup["cross_split"].sum())
    if n_cross:
        warnings.append(f"{n_cross} duplicate pair(s) cross splits: the test score leaks (see duplicates.csv)")
    n_xlabel = int(dup["cross_label"].sum())
    if n_xlabel:
        warnings.append(f"{n_xlabel} duplicate pair(s) carry different labels (see duplicates.csv)")
    n_bad = int(feats["flag_unreadable"].sum())
    if n_bad:
        warnings.append(f"{n_bad} image(s) could not be read (listed in audit_features.csv, column error)")

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    features_path = out / AUDIT_FEATURES_FILE
    feats.to_csv(features_path, index=False, lineterminator="\n")
    dup_path = out / DUPLICATES_FILE
    dup.to_csv(dup_path, index=False, lineterminator="\n")
    elapsed = time.perf_counter() - t0
    dsum = {
        "exact_pairs": int((dup["kind"] == "exact").sum()),
        "near_pairs": int((dup["kind"] == "near").sum()),
        "cross_split_pairs": n_cross,
        "cross_label_pairs": n_xlabel,
    }
    meta_version = None
    if kind == "split" and (src.parent / SPLIT_META_FILE).is_file():
        meta_version = json.loads((src.parent / SPLIT_META_FILE).read_text()).get("dataset_version")
    summary = {
        "data": str(src),
        "kind": kind,
        "dataset_version": meta_version,
        "n_images": int(len(feats)),
        "n_unreadable": n_bad,
        "classes": classes,
        "counts": counts,
        "per_class": per_class,
        "flag_share": flag_share,
        "flag_counts": {f: int(feats[f"flag_{f}"].sum()) for f in FLAGS},
        "text_share": text_share,
        "duplicates": dsum,
        "confound": conf,
        "warnings": warnings,
        "thresholds": {
            "blur_threshold": cfg.blur_threshold,
            "dark_mean": cfg.dark_mean,
            "bright_mean": cfg.bright_mean,
            "low_contrast_std": cfg.low_contrast_std,
            "near_dup_threshold": cfg.near_dup_threshold,
            "sharp_size": SHARP_SIZE,
            "confound_margin": CONFOUND_MARGIN,
        },
        "elapsed_s": round(elapsed, 2),
    }
    json_path = out / AUDIT_JSON
    html_path = out / AUDIT_HTML
    from cxrlab.report import html as rh

    rh.write_page(html_path, _html(cfg, src, kind, feats, classes, counts_df, per_class, conf, dup, warnings, elapsed))
    elapsed = time.perf_counter() - t0
    summary["elapsed_s"] = round(elapsed, 2)
    write_json(json_path, summary, default=_json_default)
    return AuditResult(
        out=out,
        json_path=json_path,
        html_path=html_path,
        features_path=features_path,
        duplicates_path=dup_path,
        n_images=int(len(feats)),
        n_unreadable=n_bad,
        classes=classes,
        counts=counts,
        text_share=text_share,
        flag_share=flag_share,
        confound=conf,
        duplicates=dsum,
        warnings=warnings,
        elapsed_s=round(elapsed, 2),
    )


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
