"""Grouped, stratified, seeded train/val/test split of a manifest (``cxrlab data split``).

Grouping: images are joined into one group when they share a patient id, a sha256 (exact duplicates) or a
near-identical perceptual hash (Hamming distance <= ``near_dup_threshold`` on the 64-bit pHash); groups are
the connected components of those links, and a group always lands in one split whole, so no patient and no
duplicate crosses splits.

Why the near-duplicate threshold defaults to 2 bits: chest radiographs from one source look alike at pHash's
32x32 scale. Measured on cxr-full (6,378 images): no two different images are at distance 0, 15 pairs of
different patients are at 2, 212 at 4 and 1,876 at 6; linking at 4 chains 137 images of unrelated patients
(20 groups mixing classes) into one group, at 6 one group of 1,739. Re-encoding (JPEG q50) and downscaling
move pHash by <= 2 bits, so 2 catches copies that differ by compression or size; cropped copies (4-18 bits)
are beyond any safe pHash threshold and stay separate.

Stratification: every group gets the majority label of its images; target counts per class and split are
the fractions rounded by largest remainder; groups are placed largest first (seeded order among equal
sizes) into the split that most reduces the squared distance to the per-class targets. Singletons go last
and fill the targets exactly, so with enough small groups each class is within one image of its fractions.

Held-out sources (``holdout_sources``): every image of those sources goes to the ``external`` split, never to
train/val/test, and the rest is split as above. An image of another source that shares a patient or a
(near-)duplicate group with a held-out image would leak the held-out source into training: it is left out
(``excluded.csv`` says why).

Determinism: the rows are put in a canonical order (sha256, path) before anything random happens, all
randomness comes from ``np.random.default_rng(seed)``, and the files carry no timestamps or output paths,
so the same manifest content and seed give byte-identical ``split.csv`` / ``split.json`` and the same
``dataset_version`` (independent of the manifest's row order).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlab.atomic import write_json
from cxrlab.data.configs import FLAG_ALIASES, SplitConfig
from cxrlab.data.grouping import (
    PHASH_RE,
    assign_groups,
    balanced_subset,
    build_groups,
    dataset_version,
    group_matrix,
    hold_out_sources,
    image_phash,
    largest_remainder,
    majority_class,
)
from cxrlab.data.io import read_xray
from cxrlab.data.manifest import (
    EXTERNAL_SPLIT,
    MANIFEST_COLUMNS,
    SPLIT_COLUMNS,
    SPLIT_FILE,
    SPLIT_META_FILE,
    SPLITS,
    DataError,
    read_manifest,
)

EXCLUDED_FILE = "excluded.csv"  # columns: path, label, reason
AUDIT_FEATURES_FILE = "audit_features.csv"  # written by cxrlab.data.audit


@dataclass
class SplitResult:
    out: Path
    split_path: Path
    meta_path: Path
    excluded_path: Path
    dataset_version: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # class -> split -> images
    targets: dict[str, dict[str, int]]  # class -> split -> the fractions' rounded share
    n_images: int
    n_groups: int
    n_near_dup_pairs: int
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    warnings: list[str] = field(default_factory=list)
    wandb_artifact: str | None = None
    wandb_dir: Path | None = None
    holdout_sources: list[str] = field(default_factory=list)
    n_external: int = 0
    counts_by_source: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> split -> images

    @property
    def split_names(self) -> list[str]:
        """train, val, test, plus external when sources were held out."""
        return [*SPLITS, EXTERNAL_SPLIT] if self.holdout_sources else list(SPLITS)


# ------------------------------------------------------------------------------------------------ helpers


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fill_missing_hashes(df: pd.DataFrame, progress: bool) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Compute sha256 / phash where the manifest lacks them; rows that cannot be read are returned as
    (path, reason) and dropped."""
    from tqdm.auto import tqdm

    df = df.copy()
    for col in ("sha256", "phash", "patient_id"):
        if col not in df.columns:
            df[col] = ""
        df[col] = df[col].astype(str).replace({"nan": ""})
    bad: list[tuple[str, str]] = []
    need = df.index[(df["sha256"] == "") | ~df["phash"].str.fullmatch(r"[0-9a-fA-F]{16}")]
    for i in tqdm(need, desc="hashing images", disable=not progress or len(need) == 0, unit="img"):
        p = str(df.at[i, "path"])
        try:
            if df.at[i, "sha256"] == "":
                df.at[i, "sha256"] = _file_sha256(p)
            if not PHASH_RE.fullmatch(str(df.at[i, "phash"])):
                df.at[i, "phash"] = image_phash(read_xray(p))
        except (OSError, ValueError) as e:  # ImageReadError is a ValueError
            bad.append((p, f"unreadable: {getattr(e, 'reason', None) or e}"))
    if bad:
        df = df[~df["path"].isin({p for p, _ in bad})]
    return df, bad


def load_audit_flags(audit: Path) -> pd.DataFrame:
    """audit_features.csv (or the audit folder holding it) -> DataFrame indexed by path with flag_* columns."""
    p = Path(audit)
    if p.is_dir():
        p = p / AUDIT_FEATURES_FILE
    if not p.is_file():
        raise DataError(f"audit features not found: {p} (run `cxrlab data audit MANIFEST --out DIR` first)")
    feats = pd.read_csv(p, keep_default_na=False)
    if "path" not in feats.columns:
        raise DataError(f"{p} has no 'path' column; is it an audit_features.csv written by `cxrlab data audit`?")
    return feats.drop_duplicates("path").set_index("path")


def _flag_reasons(df: pd.DataFrame, feats: pd.DataFrame, flags: tuple[str, ...], src: Path) -> pd.Series:
    """Per manifest row: ';'-joined flag names that exclude it ('' = keep)."""
    names = [n for f in flags for n in FLAG_ALIASES[f]]
    names = list(dict.fromkeys(names))
    missing = [n for n in names if f"flag_{n}" not in feats.columns]
    if missing:
        raise DataError(f"{src} has no column(s) {['flag_' + n for n in missing]}; re-run `cxrlab data audit`")
    sub = feats.reindex(df["path"].astype(str))
    reasons = pd.Series([""] * len(df), index=df.index, dtype=object)
    for n in names:
        col = sub[f"flag_{n}"].astype(str).str.lower().isin(["true", "1", "1.0"]).to_numpy()
        reasons[col] = reasons[col].map(lambda r, n=n: f"{r};{n}" if r else n)
    return reasons


# ---------------------------------------------------------------------------------------------------- split


def split(cfg: SplitConfig) -> SplitResult:
    """Split ``cfg.manifest`` into train/val/test; write split.csv, split.json and excluded.csv into ``cfg.out``.

    Raises DataError for an empty manifest, an audit that is missing when ``exclude_flagged`` is given, and a
    class with fewer groups than splits it must appear in.
    """
    manifest_path = Path(cfg.manifest)
    df = read_manifest(manifest_path)
    if len(df) == 0:
        raise DataError(f"manifest {manifest_path} has no images; check the ingest output (rejects.csv)")
    if df["path"].duplicated().any():
        dup = df.loc[df["path"].duplicated(), "path"].iloc[0]
        raise DataError(f"manifest {manifest_path} lists {dup} more than once; re-run ingest")
    df["label"] = df["label"].astype(str)
    label_of = dict(zip(df["path"].astype(str), df["label"], strict=True))
    warnings: list[str] = []
    excluded: list[tuple[str, str]] = []

    # 1. audit exclusions
    if cfg.exclude_flagged:
        if cfg.audit is None:
            raise DataError("exclude_flagged needs the audit: pass --audit AUDIT_DIR (from `cxrlab data audit`)")
        feats = load_audit_flags(cfg.audit)
        covered = df["path"].astype(str).isin(feats.index)
        if not covered.any():
            raise DataError(f"the audit at {cfg.audit} covers none of the manifest's images; audit this manifest")
        if not covered.all():
            warnings.append(f"{int((~covered).sum())} images are not in the audit and were kept unchecked")
        reasons = _flag_reasons(df, feats, cfg.exclude_flagged, Path(cfg.audit))
        drop = reasons != ""
        excluded += [(str(p), f"audit flag: {r}") for p, r in zip(df.loc[drop, "path"], reasons[drop], strict=True)]
        df = df[~drop]

    # 2. hashes (only computed where the manifest lacks them) and canonical order
    df, bad = _fill_missing_hashes(df, cfg.progress)
    excluded += bad
    if len(df) == 0:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(excluded, columns=["path", "reason"]).to_csv(out / EXCLUDED_FILE, index=False)
        raise DataError(f"no images left to split after exclusions; see {out / EXCLUDED_FILE}")
    df = df.sort_values(["sha256", "path"], kind="stable").reset_index(drop=True)
    classes = sorted(df["label"].unique())
    labels = df["label"].to_numpy(dtype=object)

    # 3. groups, held-out sources, balanced subset
    rng = np.random.default_rng(cfg.seed)
    groups, n_pairs = build_groups(df, cfg.near_dup_threshold)
    external, ext_groups = df.iloc[0:0], np.zeros(0, np.int64)
    if cfg.holdout_sources:
        df, groups, external, ext_groups, leaked = hold_out_sources(
            df, groups, cfg.holdout_sources, classes, manifest_path
        )
        excluded += leaked
        if leaked:
            warnings.append(
                f"{len(leaked)} image(s) of other sources share a patient or duplicate group with a held-out image "
                f"and were left out so the held-out sources stay unseen (see {EXCLUDED_FILE})"
            )
        labels = df["label"].to_numpy(dtype=object)
    gm = group_matrix(groups, labels, classes)
    if cfg.per_class is not None:
        take = balanced_subset(gm, cfg.per_class, rng)
        keep = take[groups]
        df, groups = df[keep].reset_index(drop=True), groups[keep]
        _, groups = np.unique(groups, return_inverse=True)  # renumber, keeps canonical order
        labels = df["label"].to_numpy(dtype=object)
        gm = group_matrix(groups, labels, classes)
        got = gm.sum(axis=0)
        for c, k in zip(classes, got, strict=True):
            if k < cfg.per_class:
                warnings.append(f"class {c} has only {k} images in whole groups for per_class={cfg.per_class}")

    # 4. targets and the group-count check
    per_class_n = gm.sum(axis=0)
    targets = np.array([largest_remainder(int(n), cfg.fractions) for n in per_class_n], np.int64)
    major = majority_class(gm)
    for ci, c in enumerate(classes):
        need = int((targets[ci] > 0).sum())
        have = int((major == ci).sum())
        if have < need:
            raise DataError(
                f"class {c} has {int(per_class_n[ci])} images in only {have} patient/duplicate group(s), fewer "
                f"than the {need} splits it must appear in with fractions {cfg.fractions}; add images of {c} "
                "or set its val/test fraction to 0"
            )
    mixed = int(((gm > 0).sum(axis=1) > 1).sum())
    if mixed:
        warnings.append(
            f"{mixed} group(s) hold images of more than one class (same patient or duplicate image with different "
            "labels); each went to one split as a whole - see the group column of split.csv"
        )

    # 5. assignment
    assign = assign_groups(gm, targets, rng)
    split_names = np.array(SPLITS, dtype=object)[assign[groups]]
    df["split"] = split_names
    width = max(4, len(str(len(gm) - 1)))
    df["group"] = [f"g{g:0{width}d}" for g in groups]
    counts = {c: {s: int(((labels == c) & (split_names == s)).sum()) for s in SPLITS} for c in classes}
    tgt = {c: {s: int(targets[ci, si]) for si, s in enumerate(SPLITS)} for ci, c in enumerate(classes)}
    for c in classes:
        for s in SPLITS:
            if tgt[c][s] > 0 and counts[c][s] == 0:
                warnings.append(f"class {c} has no images in {s} (its groups are too large for the fractions)")
    if len(external):
        external = external.copy()
        external["split"] = EXTERNAL_SPLIT
        external["group"] = [f"x{g:0{width}d}" for g in ext_groups]
        for c in classes:
            counts[c][EXTERNAL_SPLIT] = int((external["label"] == c).sum())
        df = pd.concat([df, external], ignore_index=True)
    version = dataset_version(
        df["sha256"].astype(str).tolist(), df["label"].tolist(), df["split"].tolist(), cfg.seed, cfg.fractions
    )
    split_order = [*SPLITS, EXTERNAL_SPLIT]
    by_source: dict[str, dict[str, int]] = {}
    if "source" in df.columns:
        tab = pd.crosstab(df["source"].astype(str), df["split"])
        by_source = {
            str(s): {sp: int(tab.loc[s, sp]) for sp in split_order if sp in tab.columns} for s in sorted(tab.index)
        }

    # 6. write (manifest order for readability: canonical order is sha-sorted, so sort by split then path)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lead = [c for c in MANIFEST_COLUMNS if c in df.columns]
    rest = [c for c in df.columns if c not in lead and c not in SPLIT_COLUMNS]
    df["_s"] = df["split"].map({s: i for i, s in enumerate(split_order)})
    table = df.sort_values(["_s", "label", "path"], kind="stable")[lead + rest + SPLIT_COLUMNS]
    split_path = out / SPLIT_FILE
    table.to_csv(split_path, index=False, lineterminator="\n")
    excluded_path = out / EXCLUDED_FILE
    ex = pd.DataFrame(excluded, columns=["path", "reason"])
    ex.insert(1, "label", [label_of.get(p, "") for p in ex["path"]])
    ex.sort_values("path").to_csv(excluded_path, index=False, lineterminator="\n")
    meta = {
        "dataset_version": version,
        "classes": classes,
        "seed": cfg.seed,
        "fractions": dict(zip(SPLITS, cfg.fractions, strict=True)),
        "per_class": cfg.per_class,
        "near_dup_threshold": cfg.near_dup_threshold,
        "exclude_flagged": list(cfg.exclude_flagged),
        "n_images": len(df),
        "n_external": len(external),
        "n_groups": len(gm),
        "n_mixed_label_groups": mixed,
        "n_near_dup_pairs": n_pairs,
        "n_excluded": len(excluded),
        "counts": counts,
        "targets": tgt,
        "totals": {s: int((df["split"] == s).sum()) for s in split_order if s in SPLITS or len(external)},
        "holdout_sources": list(cfg.holdout_sources),
        "counts_by_source": by_source,
        "manifest": str(manifest_path.resolve()),
        "warnings": warnings,
    }
    meta_path = out / SPLIT_META_FILE
    write_json(meta_path, meta)
    res = SplitResult(
        out=out,
        split_path=split_path,
        meta_path=meta_path,
        excluded_path=excluded_path,
        dataset_version=version,
        classes=classes,
        counts=counts,
        targets=tgt,
        n_images=len(df),
        n_groups=len(gm),
        n_near_dup_pairs=n_pairs,
        excluded=excluded,
        warnings=warnings,
        holdout_sources=list(cfg.holdout_sources),
        n_external=len(external),
        counts_by_source=by_source,
    )
    _log_wandb(cfg, res, table)
    return res


# ---------------------------------------------------------------------------------------------------- W&B


def artifact_name(cfg: SplitConfig) -> str:
    """``data-<name>-split``; the name defaults to ``xray-tiny`` for a per-class subset, else ``xray``."""
    name = cfg.name or ("xray-tiny" if cfg.per_class else "xray")
    return f"data-{name}-split"


def _table_sample(table: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    if len(table) <= rows:
        return table
    rng = np.random.default_rng(seed)
    keys = table["label"].astype(str) + "/" + table["split"].astype(str)
    per = max(1, rows // max(1, keys.nunique()))
    picks = []
    for _, idx in table.groupby(keys, sort=True).groups.items():
        idx = np.array(sorted(idx))
        picks.extend(rng.choice(idx, size=min(per, len(idx)), replace=False).tolist())
    return table.loc[sorted(picks)]


def _log_wandb(cfg: SplitConfig, res: SplitResult, table: pd.DataFrame) -> None:
    """Log split.csv/split.json as a dataset artifact and a thumbnail table when tracking is on."""
    from cxrlab.tracking import resolve_wandb_mode, wandb_dirs

    mode = resolve_wandb_mode(cfg.wandb)
    if mode == "disabled":
        return
    with wandb_dirs(res.out) as wdir:  # this run's W&B files in the split dir, the environment restored after
        _log_wandb_run(cfg, res, table, mode, wdir)


def _log_wandb_run(cfg: SplitConfig, res: SplitResult, table: pd.DataFrame, mode: str, wdir: Path) -> None:
    import cv2
    import wandb

    run = wandb.init(
        project=cfg.wandb_project,
        entity=cfg.wandb_entity,
        job_type="split",
        mode=mode,
        dir=str(wdir),
        config={
            "seed": cfg.seed,
            "fractions": list(cfg.fractions),
            "per_class": cfg.per_class,
            "exclude_flagged": list(cfg.exclude_flagged),
            "near_dup_threshold": cfg.near_dup_threshold,
            "dataset_version": res.dataset_version,
        },
        reinit="finish_previous",
    )
    try:
        name = artifact_name(cfg)
        art = wandb.Artifact(
            name,
            type="dataset",
            description=f"grouped stratified split {res.dataset_version}",
            metadata={"dataset_version": res.dataset_version, "counts": res.counts, "classes": res.classes},
        )
        art.add_file(str(res.split_path))
        art.add_file(str(res.meta_path))
        run.log_artifact(art, aliases=[res.dataset_version])
        if cfg.table_rows > 0:
            wt = wandb.Table(columns=["thumbnail", "label", "split", "width", "height", "group", "source", "path"])
            for _, r in _table_sample(table, cfg.table_rows, cfg.seed).iterrows():
                try:
                    g = read_xray(r["path"])
                except (OSError, ValueError):
                    continue
                s = 128 / max(g.shape)
                thumb = cv2.resize(g, (max(1, round(g.shape[1] * s)), max(1, round(g.shape[0] * s))), cv2.INTER_AREA)
                wt.add_data(
                    wandb.Image(thumb),
                    r["label"],
                    r["split"],
                    int(g.shape[1]),
                    int(g.shape[0]),
                    r["group"],
                    str(r.get("source", "")),
                    r["path"],
                )
            run.log({"split_table": wt})
        run.summary["dataset_version"] = res.dataset_version
        res.wandb_artifact = name
        res.wandb_dir = wdir
    finally:
        run.finish()
