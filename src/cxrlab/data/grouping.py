"""The building blocks of a leak-free split: perceptual hashes and near-duplicate pairs, patient/duplicate groups
(connected components), class-balanced group assignment to splits by largest remainder, the dataset version
hash, and holding sources out whole (with every group they touch). Arrays in, arrays out; ``cxrlab.data.split``
reads and writes the files."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlab.data.manifest import DataError, has_sources

# ------------------------------------------------------------------------------------------ building blocks

PHASH_RE = re.compile(r"[0-9a-fA-F]{16}")  # the manifest's phash format: 64 bits as 16 hex chars


def phash_to_int(values: pd.Series | list[str]) -> np.ndarray:
    """16-hex-char pHash strings -> uint64 array (invalid or empty -> raises ValueError)."""
    return np.array([int(str(h), 16) for h in values], dtype=np.uint64)


def image_phash(gray: np.ndarray) -> str:
    """64-bit pHash (imagehash, 16 hex chars) of a 2-D uint8 image, the manifest's ``phash`` format."""
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(np.ascontiguousarray(gray))))


def near_duplicate_pairs(hashes: np.ndarray, threshold: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) whose 64-bit hashes differ in at most ``threshold`` bits.

    Exact all-pairs comparison with a vectorised popcount, in row blocks so memory stays ~``block * n * 8``
    bytes: ~0.1 s for 6k hashes, O(n^2) beyond (100k hashes take tens of seconds).
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if threshold < 0 or n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    out_i, out_j = [], []
    for a in range(0, n, block):
        b = min(n, a + block)
        d = np.bitwise_count(h[a:b, None] ^ h[None, a:])  # rows a..b vs columns a..n
        ii, jj = np.nonzero(d <= threshold)
        jj = jj + a
        ii = ii + a
        keep = jj > ii
        out_i.append(ii[keep])
        out_j.append(jj[keep])
    return np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)


def _connected_groups(n: int, edges_i: list[np.ndarray], edges_j: list[np.ndarray]) -> np.ndarray:
    """Component label per node (numbered by the smallest member index, so the numbering is canonical)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ii = np.concatenate([np.arange(n), *edges_i]) if edges_i else np.arange(n)
    jj = np.concatenate([np.arange(n), *edges_j]) if edges_j else np.arange(n)
    graph = coo_matrix((np.ones(len(ii), np.int8), (ii, jj)), shape=(n, n))
    _, lab = connected_components(graph, directed=False)
    # renumber by first occurrence in canonical row order
    _, first = np.unique(lab, return_index=True)
    order = np.argsort(first)
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return remap[lab]


def _key_edges(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges linking each row to the first row with the same (non-empty) key."""
    s = pd.Series(keys)
    valid = s.astype(str).str.len() > 0
    idx = np.arange(len(s))
    first = pd.Series(idx[valid.to_numpy()]).groupby(s[valid].to_numpy()).transform("min").to_numpy()
    return idx[valid.to_numpy()], first


def build_groups(df: pd.DataFrame, near_dup_threshold: int) -> tuple[np.ndarray, int]:
    """Group index per row of ``df`` (patient id, sha256 and pHash near-duplicate links) and the number of
    near-duplicate pairs found. ``df`` needs sha256, phash and patient_id columns (phash may be empty)."""
    n = len(df)
    ei, ej = [], []
    for col in ("patient_id", "sha256"):
        if col in df.columns:
            a, b = _key_edges(df[col].astype(str).to_numpy(dtype=object))
            ei.append(a)
            ej.append(b)
    n_pairs = 0
    if near_dup_threshold >= 0 and "phash" in df.columns:
        ph = df["phash"].astype(str)
        ok = ph.str.fullmatch(r"[0-9a-fA-F]{16}").to_numpy()
        rows = np.nonzero(ok)[0]
        pi, pj = near_duplicate_pairs(phash_to_int(ph[ok]), near_dup_threshold)
        n_pairs = len(pi)
        ei.append(rows[pi])
        ej.append(rows[pj])
    return _connected_groups(n, ei, ej), n_pairs


def largest_remainder(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Integer shares of ``n`` proportional to ``fractions`` that sum to ``n`` (ties go to earlier splits)."""
    raw = [n * f for f in fractions]
    base = [math.floor(x + 1e-9) for x in raw]
    rest = n - sum(base)
    order = sorted(range(len(raw)), key=lambda k: (-(raw[k] - base[k]), k))
    for k in order[:rest]:
        base[k] += 1
    return base


def group_matrix(groups: np.ndarray, labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """(n_groups, n_classes) image counts."""
    cidx = np.searchsorted(np.array(classes, dtype=object), labels)
    m = np.zeros((groups.max() + 1 if len(groups) else 0, len(classes)), np.int64)
    np.add.at(m, (groups, cidx), 1)
    return m


def majority_class(gm: np.ndarray) -> np.ndarray:
    return np.argmax(gm, axis=1)  # ties -> first class in sorted order (deterministic)


def balanced_subset(gm: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of groups forming a subset with at most ``per_class`` images of every class.

    Groups are visited in a seeded random order and taken whole while no class would overflow; small groups
    visited later fill the remaining room, so every class with enough images gets exactly ``per_class``.
    """
    take = np.zeros(len(gm), bool)
    have = np.zeros(gm.shape[1], np.int64)
    for g in rng.permutation(len(gm)):
        if np.all(have + gm[g] <= per_class):
            take[g] = True
            have += gm[g]
            if np.all(have == per_class):
                break
    return take


def assign_groups(gm: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split index per group: largest groups first, each to the split that most reduces the squared error
    between per-class counts and ``targets`` (n_classes, n_splits); then single-group moves that still help."""
    n_groups = len(gm)
    cur = np.zeros_like(targets)
    sizes = gm.sum(axis=1)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-sizes[order], kind="stable")]
    assign = np.empty(n_groups, np.int64)
    open_splits = targets.sum(axis=0) > 0
    for g in order:
        v = gm[g][:, None]  # (n_classes, 1)
        delta = (v * (2 * (cur - targets) + v)).sum(axis=0).astype(float)
        delta[~open_splits] = np.inf
        s = int(np.argmin(delta))
        assign[g] = s
        cur[:, s] += gm[g]
    # refinement: move a group when it lowers the error (rarely needed; bounded passes)
    for _ in range(3):
        moved = False
        for g in order:
            s = assign[g]
            v = gm[g]
            if not v.any():
                continue
            remove = (v * (-2 * (cur[:, s] - targets[:, s]) + v)).sum()
            add = (v[:, None] * (2 * (cur - targets) + v[:, None])).sum(axis=0).astype(float)
            add[s] = np.inf
            add[~open_splits] = np.inf
            t = int(np.argmin(add))
            if add[t] + remove < 0:
                cur[:, s] -= v
                cur[:, t] += v
                assign[g] = t
                moved = True
        if not moved:
            break
    return assign


def dataset_version(sha: list[str], labels: list[str], splits: list[str], seed: int, fractions: tuple) -> str:
    """``xray-<12 hex>``: hash of the sorted (sha256, label, split) rows + seed + fractions."""
    h = hashlib.sha256()
    for row in sorted(zip(sha, labels, splits, strict=True)):
        h.update(("\t".join(row) + "\n").encode())
    h.update(json.dumps({"seed": seed, "fractions": list(fractions)}, sort_keys=True).encode())
    return "xray-" + h.hexdigest()[:12]


def hold_out_sources(
    df: pd.DataFrame, groups: np.ndarray, holdout: tuple[str, ...], classes: list[str], where: Path
) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray, list[tuple[str, str]]]:
    """(rows to split, their groups, held-out rows, their groups, left-out rows as (path, reason)); groups are
    renumbered in canonical order on each side.

    Rows of other sources in a group that holds a held-out image are left out: they are the same patient or the
    same picture, and training on them would let the held-out source in through the back door."""
    if not has_sources(df):
        raise DataError(
            f"{where} records no source per image, so --holdout-source has nothing to match; re-run `cxrlab data "
            "ingest` (it writes the source column: SOURCES.csv, --source-regex or the root folder's name)"
        )
    src = df["source"].astype(str)
    known = sorted(src.unique())
    unknown = [s for s in holdout if s not in known]
    if unknown:
        raise DataError(f"held-out source(s) {unknown} are not in {where}; its sources are: {', '.join(known)}")
    held = src.isin(holdout).to_numpy()
    touched = np.isin(groups, np.unique(groups[held]))
    leak = touched & ~held
    leaked = [
        (str(p), f"shares a patient or duplicate group with an image of held-out source(s) {', '.join(holdout)}")
        for p in df.loc[leak, "path"]
    ]
    keep = ~touched
    rest = df[keep].reset_index(drop=True)
    missing = [c for c in classes if not (rest["label"] == c).any()]
    if missing:
        raise DataError(
            f"holding out {', '.join(holdout)} leaves no image of class {', '.join(missing)} to train on; hold out "
            "fewer sources, or sources that do not hold every image of a class"
        )
    _, rest_groups = np.unique(groups[keep], return_inverse=True)  # renumber, keeps canonical order
    _, held_groups = np.unique(groups[held], return_inverse=True)
    return rest, rest_groups, df[held].reset_index(drop=True), held_groups, leaked
