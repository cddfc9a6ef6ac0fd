"""The manifest: one row per image, the contract between every data stage.

``manifest.csv`` (written by ``ingest``) has MANIFEST_COLUMNS; ``split.csv`` (written by ``split``) adds
SPLIT_COLUMNS. Paths are absolute so a manifest can be used from any working directory. ``split.json`` beside
``split.csv`` holds the dataset version id, class names, seed and fractions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxrlab.errors import CxrlabError

MANIFEST_COLUMNS = [
    "path",  # absolute path of the image file
    "label",  # class name (folder name or CSV label)
    "sha256",  # of the file bytes
    "width",
    "height",
    "mode",  # PIL mode of the original (L, I;16, RGB, RGBA, P) or DICOM photometric interpretation
    "bit_depth",  # bits per sample of the original (8, 16, 12 ...)
    "patient_id",  # CSV column, --patient-regex or SOURCES.csv; else path below SRC sans suffix (own patient)
    "source_split",  # original split of the source layout (Kaggle train/test) or ""
    "phash",  # 64-bit perceptual hash as 16 hex chars (near-duplicate detection)
    "source",  # where the image comes from (hospital / collection): SOURCES.csv, CSV column, regex or root folder
]
SPLIT_COLUMNS = ["split", "group"]  # split in {train, val, test}; group = connected patient/duplicate group
SPLITS = ("train", "val", "test")
EXTERNAL_SPLIT = "external"  # images of held-out sources (``split --holdout-source``): never trained or tuned on
ALL_SPLITS = (*SPLITS, EXTERNAL_SPLIT)

MANIFEST_FILE = "manifest.csv"
REJECTS_FILE = "rejects.csv"  # columns: path, reason
SPLIT_FILE = "split.csv"
SPLIT_META_FILE = "split.json"


_STR_COLUMNS = {"patient_id": str, "source_split": str, "phash": str, "sha256": str, "source": str}


class DataError(CxrlabError):
    """The data given to a stage is unusable; the message says which path and what to do."""


@dataclass(frozen=True)
class SplitInfo:
    """A loaded split: the table plus its metadata."""

    table: pd.DataFrame
    classes: list[str]
    dataset_version: str
    root: Path  # directory holding split.csv / split.json

    def subset(self, split: str) -> pd.DataFrame:
        return self.table[self.table["split"] == split].reset_index(drop=True)

    @property
    def has_sources(self) -> bool:
        """True when the table records a source for its images (``source`` column, not all empty)."""
        return has_sources(self.table)


def has_sources(df: pd.DataFrame) -> bool:
    """True when ``df`` has a ``source`` column with at least one non-empty value."""
    return "source" in df.columns and bool((df["source"].astype(str).str.len() > 0).any())


def read_manifest(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    if not p.is_file():
        raise DataError(f"manifest not found: {p} (run `cxrlab data ingest SRC --out DIR` first)")
    df = pd.read_csv(p, dtype=_STR_COLUMNS, keep_default_na=False)
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise DataError(f"{p} is not a cxrlab manifest: missing columns {missing}")
    return df


def load_split(path: str | Path) -> SplitInfo:
    """Load ``split.csv`` + ``split.json`` from a split directory (or the csv path itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / SPLIT_FILE
    if not p.is_file():
        raise DataError(f"split not found: {p} (run `cxrlab data split MANIFEST --out DIR` first)")
    df = pd.read_csv(p, dtype=_STR_COLUMNS, keep_default_na=False)
    if "split" not in df.columns or "label" not in df.columns or "path" not in df.columns:
        raise DataError(f"{p} is not a cxrlab split file: it needs path, label and split columns")
    meta_path = p.parent / SPLIT_META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    classes = list(meta.get("classes") or sorted(df["label"].unique()))
    version = str(meta.get("dataset_version") or "unversioned")
    return SplitInfo(table=df, classes=classes, dataset_version=version, root=p.parent)
