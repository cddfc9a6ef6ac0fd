"""Typed configs of the data stage: ingest, split, audit and the phantom generator.

They live apart from the stage modules (which import numpy, pandas and OpenCV) so the command line can build its
options from them, defaults and help included, without importing a stage: ``cxrlab --help`` stays fast. The stage
modules re-export them (``from cxrlab.data.split import SplitConfig`` works).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from cxrlab.config import StrictModel

PHANTOM_CLASSES = ("COVID19", "NORMAL", "PNEUMONIA")
MarkerStyle = Literal["laterality", "corner"]
# Flag names a split can exclude on (columns ``flag_<name>`` of audit_features.csv); "exposure" = either side.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "blur": ("blur",),
    "exposure": ("underexposed", "overexposed", "low_contrast"),
    "underexposed": ("underexposed",),
    "overexposed": ("overexposed",),
    "low_contrast": ("low_contrast",),
    "text": ("text",),
    "unreadable": ("unreadable",),
}
DEFAULT_NEAR_DUP_THRESHOLD = 2


class IngestConfig(StrictModel):
    """What to ingest and where to write. ``src`` is a folder or a CSV listing; see ``cxrlab.data.ingest``."""

    src: Path = Field(description="class folders, Kaggle train/+test/ folder, or CSV of path,label[,patient_id]")
    out: Path = Field(description="output folder: manifest.csv, rejects.csv, ingest.json")
    extra_src: tuple[Path, ...] = Field((), description="more roots (same kinds as src) ingested into one manifest")
    patient_regex: str | None = Field(
        None,
        description=r"regex on the file name giving the patient id (first group, else the whole match), e.g. "
        r"'(person\d+)_' for Kermany names; default: CSV column, SOURCES.csv, else one patient per image",
    )
    source_regex: str | None = Field(
        None,
        description="regex on the path below the root's parent (root/class/file) giving the source (first group, "
        "else the whole match); default: CSV column, SOURCES.csv, else the root folder's name",
    )
    source_column: str = Field(
        "source", min_length=1, description="column naming the source in a CSV listing or a SOURCES.csv"
    )
    source_names: tuple[str, ...] = Field(
        (), description="source name of each root, in order; overrides SOURCES.csv (default: the root folder's name)"
    )
    strict: bool = Field(
        False, description="fail when any file is rejected (the outputs are still written; IngestRejectsError)"
    )
    csv: bool | None = Field(
        None, description="read SRC as a CSV listing (true), or require a folder (false); default: *.csv is a CSV"
    )
    use_sources_csv: bool = Field(True, description="take patient ids from a SOURCES.csv beside the images")
    workers: int = Field(2, ge=0, description="decoder processes (0 or 1 = in-process)")
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("patient_regex", "source_regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"{v!r} is not a valid regular expression: {e}") from None
        return v

    @property
    def roots(self) -> list[Path]:
        return [Path(self.src), *(Path(p) for p in self.extra_src)]


class SplitConfig(StrictModel):
    """What ``split`` reads and how it splits. ``manifest`` is a manifest.csv or the folder holding it."""

    manifest: Path = Field(description="manifest.csv from `cxrlab data ingest`, or its folder")
    out: Path = Field(description="output folder: split.csv, split.json, excluded.csv")
    fractions: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train,val,test shares (sum 1)")
    seed: int = Field(42, description="random seed (same manifest + seed -> byte-identical split)")
    per_class: int | None = Field(
        None, ge=1, description="draw a balanced subset of N images per class (whole groups) first"
    )
    exclude_flagged: tuple[str, ...] = Field(
        (),
        description="leave out images the audit flagged (needs the audit): blur, exposure (under/over/low contrast), "
        "underexposed, overexposed, low_contrast, text, unreadable",
    )
    audit: Path | None = Field(None, description="audit folder (or its audit_features.csv), for exclude_flagged")
    near_dup_threshold: int = Field(
        DEFAULT_NEAR_DUP_THRESHOLD, ge=-1, le=64, description="max pHash Hamming distance of near duplicates (-1: off)"
    )
    holdout_sources: tuple[str, ...] = Field(
        (), description="sources whose images all go to an 'external' split, never to train/val/test"
    )
    name: str | None = Field(
        None, description="dataset name for the W&B artifact data-<name>-split (default xray / xray-tiny)"
    )
    wandb: Literal["auto", "online", "offline", "off"] = Field(
        "off", description="log the split as a W&B dataset artifact: auto|online|offline|off"
    )
    wandb_project: str = Field("cxr-classification", description="W&B project (the training Config's project)")
    wandb_entity: str | None = None
    table_rows: int = Field(300, ge=0, description="rows (thumbnails) in the W&B split table, stratified sample")
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or v[0] <= 0 or not math.isclose(sum(v), 1.0, abs_tol=1e-6):
            raise ValueError(f"fractions (train, val, test) must be >= 0, train > 0, and sum to 1; got {v}")
        return v

    @field_validator("exclude_flagged")
    @classmethod
    def _flags(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [f for f in v if f not in FLAG_ALIASES]
        if bad:
            raise ValueError(f"unknown flag(s) {bad}; valid: {', '.join(FLAG_ALIASES)}")
        return tuple(dict.fromkeys(v))


class AuditConfig(StrictModel):
    """What to audit and the flag thresholds. ``data``: manifest.csv / split.csv or a folder holding one."""

    data: Path = Field(
        description="manifest.csv or split.csv, or the folder holding one (a split adds per-split counts)"
    )
    out: Path = Field(description="output folder: audit.html, audit.json, audit_features.csv, duplicates.csv")
    workers: int = Field(2, ge=0, description="decoder processes (0 or 1 = in-process)")
    seed: int = Field(0, description="seed of the confound score's cross-validation")
    near_dup_threshold: int = Field(
        DEFAULT_NEAR_DUP_THRESHOLD, ge=-1, le=64, description="max pHash Hamming distance of near duplicates (-1: off)"
    )
    blur_threshold: float = Field(20.0, ge=0, description="flag blur below this Laplacian variance (256 px)")
    dark_mean: float = Field(70.0, ge=0, le=255, description="flag underexposed (too dark) below this mean intensity")
    bright_mean: float = Field(
        185.0, ge=0, le=255, description="flag overexposed (washed out) above this mean intensity"
    )
    low_contrast_std: float = Field(20.0, ge=0, description="flag low contrast below this grey-level std")
    cv_folds: int = Field(5, ge=2)
    gallery_per_flag: int = Field(12, ge=0, description="thumbnails per flag in audit.html")
    progress: bool = Field(True, description="show a progress bar")


class SynthConfig(StrictModel):
    """What ``cxrlab.data.synth.generate`` draws: phantoms per class, their size, seed and planted markers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: Path = Field(description="output folder; phantoms are written to OUT/<class>/*.png")
    n_per_class: int = Field(100, ge=1, description="phantoms per class")
    size: int = Field(256, ge=32, description="image side in pixels (square)")
    seed: int = Field(0, description="random seed (same seed -> same images)")
    classes: tuple[str, ...] = PHANTOM_CLASSES
    shortcut_class: str | None = Field(
        None,
        description="plant a burned-in text marker in this class only: a known shortcut for testing audit/explain",
    )
    shortcut_prob: float = Field(
        1.0, ge=0, le=1, description="share of the shortcut class's images that get the marker"
    )
    marker_all: bool = Field(False, description="put markers on every class (no shortcut)")
    marker_style: MarkerStyle = "laterality"
    fmt: str = "png"
