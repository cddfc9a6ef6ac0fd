"""Typed configs of the analysis stages: evaluate, compare, explain, mine, validate.

They live apart from the stage modules (which import torch, pandas and OpenCV) so the command line can build its
options from them, defaults and help included, without importing a stage: ``cxrlab --help`` stays fast. The stage
modules re-export them (``from cxrlab.analysis.evaluate import EvalConfig`` works).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from cxrlab.config import StrictModel, field_default
from cxrlab.data.configs import DEFAULT_NEAR_DUP_THRESHOLD, SplitConfig

COSTLY_CLASS_HELP = (
    "the class whose false negatives cost most (matched across spellings), shown first and as the headline recall; "
    "default: the run's costly_class (COVID19 for a run that does not name one)"
)


class EvalConfig(StrictModel):
    """What to evaluate, on which data, and where the results go."""

    target: Path = Field(description="run directory (runs/<id>) or model bundle directory")
    split: Literal["test", "val", "external"] = Field(
        "test",
        description="split of the run's own data (or of --data's split): test, val or external (held-out sources)",
    )
    data: Path | None = Field(
        None,
        description="evaluate on other data: a folder of class folders (a subset of the classes is fine), a manifest "
        "or a split csv (its split's rows)",
    )
    out: Path | None = Field(None, description="output folder; default <run>/eval-<split> or eval-<data name>")
    batch_size: int = Field(32, ge=1, description="images per forward pass")
    seed: int = Field(0, description="seed of the bootstrap resampling")
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples for the 95% CIs (0 = none)")
    ci_level: float = Field(0.95, gt=0, lt=1)
    n_bins: int = Field(15, ge=1, description="confidence bins of the expected calibration error")
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...")
    wandb: Literal["auto", "off"] = Field("auto", description="auto = log to the run's W&B run when it has one; off")
    costly_class: str | None = Field(None, min_length=1, description=COSTLY_CLASS_HELP)
    progress: bool = Field(True, description="show a progress bar")
    report: bool = Field(True, description="write report.html and the PNG figures")


class CompareConfig(StrictModel):
    """Two models (run or bundle directories) evaluated on the same items."""

    baseline: Path
    challenger: Path
    split: Literal["test", "val", "external"] = Field(
        "test", description="split of the runs' own data both are evaluated on: test, val or external"
    )
    data: Path | None = Field(None, description="compare on this data instead of the runs' own split")
    out: Path | None = Field(None, description="output folder; default ./compare-<baseline>-vs-<challenger>")
    batch_size: int = Field(32, ge=1, description="images per forward pass")
    seed: int = Field(0, description="seed of the bootstrap resampling")
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples for the 95% CIs (0 = none)")
    ci_level: float = Field(0.95, gt=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the verdict")
    n_bins: int = Field(15, ge=1)
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...")
    costly_class: str | None = Field(
        None, min_length=1, description=COSTLY_CLASS_HELP.replace("the run's", "the baseline run's")
    )
    progress: bool = Field(True, description="show a progress bar")
    report: bool = True


class ExplainConfig(StrictModel):
    """What to explain, on which images, how, and where the results go."""

    target: Path = Field(description="run directory or bundle directory")
    split: Literal["test", "val", "train"] = Field(
        "test", description="split of the run's data (or of --data's): test|val|train"
    )
    data: Path | None = Field(
        None, description="other images: a folder of class folders, a manifest or split csv (or its folder)"
    )
    only_errors: bool = Field(False, description="explain only the misclassified images")
    method: Literal["gradcam", "gradcam++"] = Field("gradcam", description="gradcam | gradcam++")
    cam_target: Literal["margin", "logit"] = Field(
        "margin", description="margin (predicted logit minus the others' mean) | logit (classic Grad-CAM)"
    )
    target_layer: str | None = Field(
        None, description="module name of the CAM layer (default: the last convolutional stage)"
    )
    out: Path | None = Field(None, description="output folder (default <run>/explain-<split>)")
    batch_size: int = Field(16, ge=1, description="images per forward pass")
    max_images: int | None = Field(None, ge=1, description="explain a seeded sample of N images")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    border: float = Field(0.08, gt=0, lt=0.5, description="width of the border frame, as a share of each side")
    text_dilate: float = Field(0.015, ge=0, lt=0.2, description="dilation of the text mask, as a share of the side")
    thumb_size: int = Field(192, ge=32, le=1024, description="longer side of the HTML thumbnails in pixels")
    wandb: Literal["auto", "off"] = Field("auto", description="auto = add a table to the run's W&B run if tracked")
    seed: int = Field(0, description="seed of the max_images sample")
    progress: bool = True


class MineConfig(StrictModel):
    """Which errors, which pool, how to search and where results go."""

    target: Path = Field(description="run directory (runs/<id>) or its bundle")
    pool: Path = Field(description="folder of unlabelled images to search (walked recursively)")
    split: Literal["test", "val", "train"] = Field(
        "test", description="split whose misclassified images are the queries"
    )
    images: Path | None = Field(
        None,
        description="query these images instead of the errors: a folder, or a CSV (column 'path') / text list of paths",
    )
    k: int = Field(10, ge=1, le=1000, description="neighbours per query")
    index: Literal["auto", "exact", "hnsw", "ivf"] = Field(
        "auto", description="auto (exact up to --exact-max pool images, faiss HNSW above) | exact | hnsw | ivf"
    )
    exact_max: int = Field(50_000, ge=0, description="index=auto: exact search up to this pool size")
    dedup_against: Literal["split", "train"] = Field(
        "split",
        description="drop pool images that duplicate (sha256 or pHash) the run's whole split, or only its train part",
    )
    near_dup_threshold: int = Field(
        DEFAULT_NEAR_DUP_THRESHOLD, ge=-1, le=64, description="pHash Hamming distance counted as a duplicate (-1: off)"
    )
    out: Path | None = Field(None, description="output folder (default <run>/mine-<split>)")
    cache: Path | None = Field(None, description="embedding cache folder (default <run>/mine-cache)")
    batch_size: int = Field(32, ge=1, description="images per forward pass")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    thumb_size: int = Field(128, ge=32, le=512, description="longer side of the gallery thumbnails")
    max_queries: int | None = Field(None, ge=1, description="at most N queries (the most confident errors)")
    progress: bool = True


class ValidateConfig(StrictModel):
    """Inputs of ``cxrlab validate``."""

    manifest: Path = Field(description="manifest.csv (or its folder) from `cxrlab data ingest`, with sources")
    out: Path = Field(description="output folder (folds/, validate.html/.json/.csv)")
    config: Path | None = Field(None, description="training config YAML; default configs/cpu.yaml when present")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides of the training config")
    groups: list[list[str]] = Field(
        default_factory=list, description="source groups held out one at a time; default: every source alone"
    )
    fractions: tuple[float, float, float] = Field(
        field_default(SplitConfig, "fractions"), description="train,val,test shares of the other sources"
    )
    split_seed: int = Field(field_default(SplitConfig, "seed"), description="split and bootstrap seed")
    n_boot: int = Field(field_default(EvalConfig, "n_boot"), ge=0, description="bootstrap resamples of the CIs")
    ci_level: float = Field(0.95, gt=0, lt=1)
    progress: bool = Field(True, description="show a progress bar")
