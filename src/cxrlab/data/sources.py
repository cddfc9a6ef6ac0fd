"""Sources: where each image comes from (hospital, collection), and how much the source tells about the class.

A model trained on images whose classes come from different places can learn the place instead of the disease
(DeGrave et al. 2021: COVID-19 chest X-ray models collapse on external data). The manifest's ``source`` column
(written by ``ingest``) makes this measurable:

- :func:`source_audit` (used by ``cxrlab data audit``): the source x class table; how well the source alone
  predicts the class (each image labelled with its source's majority class: accuracy, balanced accuracy,
  per-class recall, Cramer's V); the trivial-statistics confound score *within* each source that holds several
  classes (there the source cannot be the shortcut, so what remains is the images' own look); and the classes
  that share no source with any other class, named in a plain warning.
- :func:`folder_sources`: the source of images in a plain folder (``SOURCES.csv`` beside them, else the
  folder's name), for ``evaluate --data`` and ``predict`` on folders that were never ingested.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

SOURCE_COLUMN = "source"
SOURCES_CSV = "SOURCES.csv"
SOURCE_MARGIN = 0.2  # warn when the source alone predicts the class this far above chance (balanced accuracy)


def _sources_csvs(folders: list[Path]) -> list[Path]:
    """Every SOURCES.csv below ``folders`` (symlinked folders are not followed: no loops)."""
    found = set()
    for d in folders:
        for dirpath, _, files in os.walk(d, followlinks=False):
            found |= {Path(dirpath) / f for f in files if f.lower() == SOURCES_CSV.lower()}
    return sorted(found)


def folder_sources(root: str | Path, paths: list[str], column: str = SOURCE_COLUMN) -> list[str]:
    """The source of each path under ``root``: a ``SOURCES.csv`` in ``root`` (or a sub-folder) with a ``column``
    column matched by path, else by unique file name; else ``root``'s folder name."""
    return input_sources([root], paths, column)


def input_sources(inputs: list[str | Path], paths: list[str], column: str = SOURCE_COLUMN) -> list[str]:
    """The source of each of ``paths`` found under the ``inputs`` given to ``predict`` or ``evaluate``: a
    ``SOURCES.csv`` in the input folder (or below it) when it names the file, else the name of the input folder
    holding it (a file given directly: its own folder's name). Folders, CSVs and paths are compared after
    ``os.path.realpath`` (which, unlike ``Path.resolve``, stops at a symlink loop instead of raising), and the
    CSVs are found without following symlinked folders."""
    from cxrlab.data.discover import load_sources_csv, sources_lookup

    folders = sorted({Path(os.path.realpath(i)) for i in inputs if Path(i).is_dir()}, key=lambda d: -len(d.parts))
    csvs = _sources_csvs(folders)
    maps = load_sources_csv(csvs, column) if csvs else ({}, {})
    out = []
    for raw in paths:
        p = Path(os.path.realpath(raw))
        hit = sources_lookup(maps, p)
        if not hit:
            root = next((d for d in folders if d in p.parents), p.parent)
            hit = root.name
        out.append(hit)
    return out


def source_class_table(df: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """source x class image counts (sources sorted, classes in ``classes`` order)."""
    t = pd.crosstab(df[SOURCE_COLUMN].astype(str), df["label"].astype(str))
    return t.reindex(columns=classes, fill_value=0).sort_index()


def isolated_classes(table: pd.DataFrame) -> dict[str, list[str]]:
    """Classes whose every source holds no image of any other class -> their sources."""
    out: dict[str, list[str]] = {}
    for c in table.columns:
        srcs = table.index[table[c] > 0]
        if len(srcs) == 0:
            continue
        others = table.loc[srcs].drop(columns=[c])
        if others.to_numpy().sum() == 0 and table.shape[1] > 1:
            out[str(c)] = [str(s) for s in srcs]
    return out


def source_predicts_class(df: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """How well the source alone predicts the class: every image gets its source's majority class.

    The rule has one parameter per source, so with sources of more than a handful of images in-sample and
    cross-validated scores agree; in-sample is reported (a source seen only in one fold has no prediction).
    Cramer's V (0 = independent, 1 = the source fixes the class) comes with it."""
    from scipy.stats.contingency import association
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score

    table = source_class_table(df, classes)
    majority = table.idxmax(axis=1)
    y = df["label"].astype(str).to_numpy()
    pred = df[SOURCE_COLUMN].astype(str).map(majority).to_numpy()
    present = [c for c in classes if (y == c).any()]
    rec = recall_score(y, pred, labels=present, average=None, zero_division=0)
    nz = table.loc[:, table.sum(axis=0) > 0]
    nz = nz.loc[nz.sum(axis=1) > 0]
    v = float(association(nz.to_numpy(), method="cramer")) if min(nz.shape) > 1 else 0.0
    return {
        "accuracy": round(float(accuracy_score(y, pred)), 4),
        "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 4),
        "recall": {c: round(float(r), 4) for c, r in zip(present, rec, strict=True)},
        "cramers_v": round(v, 4),
        "chance_balanced_accuracy": round(1.0 / max(1, len(present)), 4),
        "rule": "each image labelled with its source's majority class (in-sample)",
    }


def source_audit(feats: pd.DataFrame, classes: list[str], folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """The audit's source section from its feature table (path, label, source, trivial statistics, error).

    Returns ``{"table": {source: {class: n}}, "n_sources", "source_predicts_class": {...}, "per_source_confound":
    {source: confound score of that source's images}, "isolated_classes": {class: [sources]}, "warnings": [...]}``.
    """
    from cxrlab.data.confound import confound_score

    df = feats[feats[SOURCE_COLUMN].astype(str) != ""]
    table = source_class_table(df, classes)
    res: dict[str, Any] = {
        "table": {str(s): {c: int(table.loc[s, c]) for c in classes} for s in table.index},
        "n_sources": int(len(table)),
        "n_images": int(len(df)),
        "n_without_source": int(len(feats) - len(df)),
        "per_source_confound": {},
        "isolated_classes": {},
        "warnings": [],
    }
    if len(table) == 0:
        return res
    spc = source_predicts_class(df, classes)
    res["source_predicts_class"] = spc
    iso = isolated_classes(table)
    res["isolated_classes"] = iso
    warnings: list[str] = []
    for c, srcs in iso.items():
        others = [o for o in classes if o != c and table[o].sum() > 0]
        warnings.append(
            f"{c} shares no source with any other class: its {int(table[c].sum()):,} images come from "
            f"{', '.join(srcs)}, which hold no {' or '.join(others)} image. A model can recognise {c} by where an "
            "image was taken instead of by the disease; only validation on a held-out source (`cxrlab validate`, "
            "or `data split --holdout-source`) shows which it learned"
        )
    if len(table) > 1 and spc["balanced_accuracy"] >= spc["chance_balanced_accuracy"] + SOURCE_MARGIN:
        warnings.append(
            f"the source alone predicts the class with {spc['balanced_accuracy']:.2f} balanced accuracy (chance "
            f"{spc['chance_balanced_accuracy']:.2f}; Cramer's V {spc['cramers_v']:.2f}): source and class are "
            "confounded"
        )
    for s in table.index:
        row = table.loc[s]
        have = [c for c in classes if row[c] > 0]
        if len(have) < 2:
            continue
        sub = feats[(feats[SOURCE_COLUMN].astype(str) == s) & feats["label"].isin(have)]
        conf = confound_score(sub, have, folds, seed)
        conf.pop("warnings", None)
        res["per_source_confound"][str(s)] = conf
        if conf.get("confounded"):
            a = conf["all"]
            warnings.append(
                f"within source {s} ({', '.join(have)}), trivial image statistics still predict the class with "
                f"{a['balanced_accuracy']:.2f} balanced accuracy (chance {conf['chance_balanced_accuracy']:.2f}): "
                "size, exposure, sharpness or text differ between its classes; check whether that is the disease or "
                "how the images were taken"
            )
    res["warnings"] = warnings
    return res
