"""Data audit (``cxrlab data audit``): the seed's "Data Analysis", measured instead of eyeballed.

For a manifest or a split, every image is decoded once (process pool, progress bar) and measured: size,
aspect ratio, intensity (mean, spread, dark/bright pixel shares), sharpness (variance of the Laplacian
after resizing to ``SHARP_SIZE`` square, so it compares across resolutions), burned-in text / markers
(:mod:`cxrlab.data.textdetect`), sha256 and pHash. From those:

- counts per class (and split), per-class distributions, quality flags (blur, under/over-exposure, low
  contrast, text, unreadable) with the share of each class flagged;
- exact (sha256) and near (pHash) duplicates, within and across splits and labels;
- sources (when the data records them): the source x class table, how well the source alone predicts the
  class, the confound score within each source that holds several classes, and a plain warning naming the
  classes that share no source with any other class (:mod:`cxrlab.data.sources`);
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

from cxrlab.atomic import write_json
from cxrlab.data.configs import AuditConfig
from cxrlab.data.confound import CONFOUND_MARGIN, confound_score
from cxrlab.data.grouping import image_phash, near_duplicate_pairs, phash_to_int
from cxrlab.data.manifest import (
    MANIFEST_FILE,
    SPLIT_FILE,
    SPLIT_META_FILE,
    SPLITS,
    DataError,
    has_sources,
    read_manifest,
)
from cxrlab.data.parallel import map_files
from cxrlab.data.split import AUDIT_FEATURES_FILE

AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"
DUPLICATES_FILE = "duplicates.csv"
SHARP_SIZE = 256  # sharpness is measured after resizing to this square
FLAGS = ("unreadable", "blur", "underexposed", "overexposed", "low_contrast", "text", "duplicate")


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
    sources: dict[str, Any] = field(default_factory=dict)  # cxrlab.data.sources.source_audit; {} without sources


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
    if has_sources(df):
        feats["source"] = df["source"].astype(str)
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

    src_audit: dict[str, Any] = {}
    if "source" in feats.columns:
        from cxrlab.data.sources import source_audit

        src_audit = source_audit(feats, classes, cfg.cv_folds, cfg.seed)
    # the source warnings first: they name the confound that matters most
    warnings: list[str] = list(src_audit.get("warnings", [])) + list(conf.get("warnings", []))
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
        "sources": src_audit,
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
    from cxrlab.report.audit_page import render_audit_page

    page = render_audit_page(
        cfg,
        src,
        kind,
        feats,
        classes,
        counts_df,
        per_class,
        conf,
        dup,
        warnings,
        elapsed,
        flags=FLAGS,
        sharp_size=SHARP_SIZE,
        confound_margin=CONFOUND_MARGIN,
        src_audit=src_audit,
    )
    rh.write_page(html_path, page)
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
        sources=src_audit,
    )


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
