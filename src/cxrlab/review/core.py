"""The review queue of a run, export, relabel file and agreement numbers.

``load_queue(ReviewConfig) -> ReviewQueue``: the explained images of a run (``<run>/explain-<split>/``, written by
``cxrlab explain``), ordered for a reader: every error first (most confident first: the errors that matter most),
then a stratified sample of the correct predictions (``sample`` images, round-robin over the true classes, seeded).

``export_review(ExportConfig) -> ExportResult``: the answers as CSV (``answers.csv``; re-importable with
``import_answers``), the reviewed localisation agreement per run (share of "yes" with a Wilson 95% CI, written to
``agreement.json``) and, when readers corrected labels, a relabelled ``manifest.csv`` that ``cxrlab data split``
accepts (with ``relabel.csv`` listing every change and the readers behind it).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlab.review.config import ExportConfig, ReviewConfig
from cxrlab.review.store import LOCALISATION, ItemInfo, ReviewError, ReviewStore, export_csv, normalise_url

REVIEW_DIR = "review"
ANSWERS_CSV = "answers.csv"
AGREEMENT_JSON = "agreement.json"
RELABEL_CSV = "relabel.csv"


@dataclass
class ReviewItem:
    index: int
    image: str  # original path (the key)
    label: str
    prediction: str
    confidence: float
    correct: bool
    probabilities: dict[str, float]
    thumb: Path  # the model input
    overlay: Path  # the Grad-CAM overlay


@dataclass
class ReviewQueue:
    run_dir: Path
    run_id: str
    model: str
    split: str
    explain_dir: Path
    classes: list[str]
    items: list[ReviewItem]
    db_url: str
    n_errors: int
    n_explained: int
    cam: dict[str, Any] = field(default_factory=dict)  # method, target layer, cam target (from attention.json)

    def info(self, i: int) -> ItemInfo:
        it = self.items[i]
        return ItemInfo(self.run_id, self.split, it.image, it.label, it.prediction, it.confidence)

    def by_image(self) -> dict[str, ReviewItem]:
        return {it.image: it for it in self.items}


def _run_identity(run: Path) -> tuple[Path, str]:
    from cxrlab.runs import find_run_dir, read_summary

    run = Path(run)
    if not run.exists():
        raise ReviewError(f"run not found: {run} (pass a run directory runs/<id> that `cxrlab explain` was run on)")
    run_dir = find_run_dir(run) or run
    summary = read_summary(run_dir)
    return run_dir, str(summary.get("run_id") or run_dir.resolve().name)


def find_explain_dir(run_dir: Path, split: str, explain_dir: Path | None) -> Path:
    from cxrlab.runs import ATTENTION_CSV, stage_dir

    cands = (
        [Path(explain_dir)]
        if explain_dir
        else [stage_dir(run_dir, "explain", split), stage_dir(run_dir, "explain", split, tail="-errors")]
    )
    for c in cands:
        if (c / ATTENTION_CSV).is_file():
            return c
    where = cands[0] / ATTENTION_CSV
    raise ReviewError(
        f"no explained images: {where} does not exist. Run `cxrlab explain {run_dir} --split {split}` first "
        "(or pass --explain-dir to an explain output folder)"
    )


def stratified_order(labels: list[str], k: int, seed: int) -> list[int]:
    """``k`` indices drawn round-robin over the label values (each class shuffled with ``seed``)."""
    rng = np.random.default_rng(seed)
    by: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by[lab].append(i)
    pools = {lab: [idx[j] for j in rng.permutation(len(idx))] for lab, idx in sorted(by.items())}
    out: list[int] = []
    while len(out) < k and any(pools.values()):
        for lab in sorted(pools):
            if pools[lab] and len(out) < k:
                out.append(pools[lab].pop(0))
    return out


def load_queue(cfg: ReviewConfig) -> ReviewQueue:
    """The run's explained images in review order (errors first, then a stratified sample of the rest)."""
    from cxrlab.runs import ATTENTION_CSV, ATTENTION_FILE

    run_dir, run_id = _run_identity(cfg.run)
    ed = find_explain_dir(run_dir, cfg.split, cfg.explain_dir)
    csv = ed / ATTENTION_CSV
    try:
        df = pd.read_csv(csv, keep_default_na=False)
    except Exception as e:
        raise ReviewError(f"{csv} is not readable ({e}); rerun `cxrlab explain {run_dir} --split {cfg.split}`") from e
    need = ["path", "label", "prediction", "correct", "confidence", "image", "overlay"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ReviewError(f"{csv} lacks {', '.join(missing)}; rerun `cxrlab explain {run_dir} --split {cfg.split}`")
    doc: dict[str, Any] = {}
    if (ed / ATTENTION_FILE).is_file():
        try:
            doc = json.loads((ed / ATTENTION_FILE).read_text())
        except json.JSONDecodeError:
            doc = {}
    classes = list(doc.get("classes") or [c[2:] for c in df.columns if c.startswith("p_")])
    correct = df["correct"].astype(str).str.lower().isin(["true", "1"])
    err = df.index[~correct].tolist()
    err.sort(key=lambda i: -float(df.at[i, "confidence"]))
    ok = df.index[correct].tolist()
    ok_order = [ok[j] for j in stratified_order([str(df.at[i, "label"]) for i in ok], cfg.sample, cfg.seed)]
    items = []
    for i in err + ok_order:
        r = df.loc[i]
        items.append(
            ReviewItem(
                index=len(items),
                image=str(r["path"]),
                label=str(r["label"]),
                prediction=str(r["prediction"]),
                confidence=float(r["confidence"]),
                correct=bool(correct[i]),
                probabilities={c: float(r[f"p_{c}"]) for c in classes if f"p_{c}" in df.columns},
                thumb=ed / str(r["image"]),
                overlay=ed / str(r["overlay"]),
            )
        )
    model = doc.get("model", {}).get("name", "") if isinstance(doc.get("model"), dict) else ""
    return ReviewQueue(
        run_dir=run_dir,
        run_id=run_id,
        model=str(model),
        split=cfg.split,
        explain_dir=ed,
        classes=classes,
        items=items,
        db_url=normalise_url(cfg.db or "", run_dir),
        n_errors=len(err),
        n_explained=len(df),
        cam={k: doc.get(k) for k in ("method", "cam_target", "target_layer")},
    )


# ---------------------------------------------------------------------------------------------- agreement


def wilson_ci(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% by default); (nan, nan) for n = 0."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def box_mask(boxes: list[list[float]], shape: tuple[int, int]) -> np.ndarray:
    """Union of [x0, y0, x1, y1] boxes in [0, 1] as a boolean mask of ``shape`` (at least one pixel each)."""
    h, w = shape
    m = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = min(int(x0 * w), w - 1), min(int(y0 * h), h - 1)
        c1, r1 = max(c0 + 1, int(math.ceil(x1 * w))), max(r0 + 1, int(math.ceil(y1 * h)))
        m[r0:r1, c0:c1] = True
    return m


def agreement(rows: list[dict[str, Any]], cam_overlap: dict[tuple[str, str], float] | None = None) -> dict[str, Any]:
    """Reviewed localisation agreement per run: share of "yes" (and of "yes or partly") with Wilson 95% CIs over
    answers, per reader, the readers' label verdicts, and where regions were drawn the Grad-CAM mass inside them
    (``cam_overlap``: (image, reader) -> share, from :func:`cam_region_overlap`)."""
    out: dict[str, Any] = {}
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_run[r["run_id"]].append(r)
    for run_id, rs in sorted(by_run.items()):
        loc = [r for r in rs if r.get("localisation") in LOCALISATION]
        n = len(loc)
        yes = sum(r["localisation"] == "yes" for r in loc)
        partly = sum(r["localisation"] == "partly" for r in loc)
        lab = [r for r in rs if r.get("label_ok") is not None]
        doc: dict[str, Any] = {
            "answers": len(rs),
            "images": len({r["image"] for r in rs}),
            "readers": sorted({r["reader"] for r in rs}),
            "localisation_answers": n,
            "yes": yes,
            "partly": partly,
            "no": n - yes - partly,
            "share_yes": yes / n if n else math.nan,
            "share_yes_ci": list(wilson_ci(yes, n)),
            "share_yes_or_partly": (yes + partly) / n if n else math.nan,
            "share_yes_or_partly_ci": list(wilson_ci(yes + partly, n)),
            "label_answers": len(lab),
            "label_wrong": sum(r["label_ok"] is False for r in lab),
            "per_reader": {},
        }
        for reader in doc["readers"]:
            lr = [r for r in loc if r["reader"] == reader]
            y = sum(r["localisation"] == "yes" for r in lr)
            doc["per_reader"][reader] = {"n": len(lr), "share_yes": y / len(lr) if lr else math.nan}
        if cam_overlap:
            vals = [cam_overlap[(r["image"], r["reader"])] for r in rs if (r["image"], r["reader"]) in cam_overlap]
            if vals:
                doc["cam_in_region"] = {"n": len(vals), "mean": float(np.mean(vals)), "median": float(np.median(vals))}
        out[run_id] = doc
    return out


def cam_region_overlap(
    queue: ReviewQueue, rows: list[dict[str, Any]], device: str = "cpu"
) -> dict[tuple[str, str], float]:
    """Share of the Grad-CAM mass (as ``cxrlab explain`` computes it) inside each drawn region, recomputed with the
    run's bundle on the images that have regions: {(image, reader): share}."""
    from cxrlab.analysis.cam import CamEngine, attention_share
    from cxrlab.data.io import ImageReadError, read_xray
    from cxrlab.inference.bundle import load_bundle, resolve_bundle_dir

    drawn = [r for r in rows if r.get("region") and r["run_id"] == queue.run_id]
    if not drawn:
        return {}
    bundle = load_bundle(resolve_bundle_dir(queue.run_dir), device=device)
    meta = bundle.meta
    size = tuple(meta.img_size)
    out: dict[tuple[str, str], float] = {}
    cams: dict[str, np.ndarray] = {}
    cam = queue.cam or {}
    with CamEngine(
        bundle.model,
        cam.get("target_layer"),
        cam.get("method") or "gradcam",
        (1, meta.in_chans, *size),
        cam.get("cam_target") or "margin",
    ) as engine:
        for r in drawn:
            img = r["image"]
            if img not in cams:
                try:
                    gray = read_xray(img)
                except (ImageReadError, FileNotFoundError):
                    continue
                x = bundle.preprocess(gray)[None]
                cams[img] = engine(x)[0][0]
            c = cams[img]
            out[(img, r["reader"])] = attention_share(c, box_mask(r["region"], c.shape))
    return out


# ---------------------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    answers_csv: Path
    agreement_json: Path
    agreement: dict[str, Any]
    n_answers: int
    relabel_manifest: Path | None = None
    relabel_csv: Path | None = None
    n_relabelled: int = 0
    relabel_conflicts: list[str] = field(default_factory=list)


def relabel_decisions(rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per image, the readers' label verdict: {image: {old, new, readers}} where a majority of the readers who
    judged the label said it is wrong and named the same class; images where they disagree are returned as
    conflicts (listed, not relabelled)."""
    by_img: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("label_ok") is not None:
            by_img[r["image"]].append(r)
    out: dict[str, dict[str, Any]] = {}
    conflicts: list[str] = []
    for img, rs in sorted(by_img.items()):
        wrong = [r for r in rs if r["label_ok"] is False and r.get("corrected_label")]
        if not wrong:
            continue
        votes = Counter(r["corrected_label"] for r in wrong)
        (new, k), *rest = votes.most_common()
        if k * 2 <= len(rs) or (rest and rest[0][1] == k):
            conflicts.append(img)
            continue
        if new == rs[0]["label"]:  # "wrong", but the class named is the dataset's own: nothing to change
            continue
        out[img] = {"old": rs[0]["label"], "new": new, "readers": sorted(r["reader"] for r in wrong), "of": len(rs)}
    return out, conflicts


def export_review(cfg: ExportConfig) -> ExportResult:
    """Answers CSV + agreement.json (+ a relabelled manifest when readers corrected labels)."""
    from cxrlab.atomic import json_safe, write_json

    queue = load_queue(cfg)
    out = Path(cfg.out) if cfg.out else queue.run_dir / REVIEW_DIR
    out.mkdir(parents=True, exist_ok=True)
    store = ReviewStore(queue.db_url)
    try:
        rows = store.answers(queue.run_id)
    finally:
        store.close()
    csv = export_csv(rows, out / ANSWERS_CSV)
    overlap = cam_region_overlap(queue, rows, cfg.device) if cfg.cam_overlap else {}
    agr = agreement(rows, overlap)
    doc = {"format": 1, "run_id": queue.run_id, "model": queue.model, "split": queue.split, "runs": agr}
    write_json(out / AGREEMENT_JSON, json_safe(doc))
    res = ExportResult(answers_csv=csv, agreement_json=out / AGREEMENT_JSON, agreement=agr, n_answers=len(rows))
    decisions, conflicts = relabel_decisions(rows)
    res.relabel_conflicts = conflicts
    if decisions:
        res.relabel_manifest, res.relabel_csv, res.n_relabelled = write_relabel(queue, decisions, out / "relabelled")
    return res


def write_relabel(queue: ReviewQueue, decisions: dict[str, dict[str, Any]], out: Path) -> tuple[Path, Path, int]:
    """The run's split table with the readers' labels, as a ``manifest.csv`` that ``cxrlab data split`` accepts,
    plus ``relabel.csv`` (path, old_label, new_label, readers)."""
    from cxrlab.atomic import atomic_open
    from cxrlab.data.items import run_split_dir
    from cxrlab.data.manifest import MANIFEST_COLUMNS, MANIFEST_FILE, load_split
    from cxrlab.runs import read_summary

    split_dir = run_split_dir(queue.run_dir, read_summary(queue.run_dir), {})
    if split_dir is None:
        raise ReviewError(f"{queue.run_dir} does not record its split; cannot write a relabelled manifest")
    info = load_split(split_dir)
    df = info.table.copy()
    paths = df["path"].astype(str)
    changed = []
    for img, d in decisions.items():
        hit = paths == img
        if hit.any():
            df.loc[hit, "label"] = d["new"]
            changed.append(
                {"path": img, "old_label": d["old"], "new_label": d["new"], "readers": ";".join(d["readers"])}
            )
    cols = [c for c in MANIFEST_COLUMNS if c in df.columns]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / MANIFEST_FILE, "w", newline="") as f:
        df[cols].to_csv(f, index=False)
    with atomic_open(out / RELABEL_CSV, "w", newline="") as f:
        pd.DataFrame(changed, columns=["path", "old_label", "new_label", "readers"]).to_csv(f, index=False)
    return out / MANIFEST_FILE, out / RELABEL_CSV, len(changed)


@dataclass
class ImportResult:
    n_rows: int
    db: str


def import_answers(csv: Path, db_url: str) -> ImportResult:
    """Load an export CSV into a database (merge a colleague's answers; the export's round trip)."""
    from cxrlab.review.store import read_answers_csv, redact

    triples = read_answers_csv(csv)
    store = ReviewStore(db_url)
    try:
        for item, ans, at in triples:
            store.save(item, ans, answered_at=at or None)
    finally:
        store.close()
    return ImportResult(len(triples), redact(db_url))


# ---------------------------------------------------------------------------------------------- for reports

REVIEW_KEYS = ("review_yes", "review_yes_ci_low", "review_yes_ci_high", "review_n", "review_cam_in_region")


def read_agreement(run_dir: Path | None) -> dict[str, float] | None:
    """The reviewed localisation agreement of a run as flat numbers (from ``<run>/review/agreement.json``, written
    by ``cxrlab review RUN --export``): share of "yes" with its 95% CI, the number of answers, and the mean
    Grad-CAM mass inside drawn regions; None when the run has not been reviewed (or exported)."""
    if run_dir is None:
        return None
    f = Path(run_dir) / REVIEW_DIR / AGREEMENT_JSON
    try:
        doc = json.loads(f.read_text())
        a = doc["runs"][doc["run_id"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    lo, hi = (a.get("share_yes_ci") or [None, None])[:2]
    out = {
        "review_yes": a.get("share_yes"),
        "review_yes_ci_low": lo,
        "review_yes_ci_high": hi,
        "review_n": a.get("localisation_answers"),
        "review_cam_in_region": (a.get("cam_in_region") or {}).get("mean"),
    }
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float)} or None
