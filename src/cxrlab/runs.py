"""The run-directory contract: every file name of a run, and the readers of the files other stages share.

A run directory, as ``cxrlab train`` writes it and every later stage reads it::

    runs/<id>/
      config.yaml              the resolved Config                            (train)
      metrics.csv              one row per epoch                              (train)
      summary.json             RunResult: paths, best metric, timings         (train)
      wandb.json               W&B run id and mode, so a resume continues it  (train)
      checkpoints/last.ckpt    Lightning state to resume from                 (train)
      checkpoints/best.ckpt    the best epoch's weights (the bundle's)        (train)
      bundle/bundle.json       model, classes, preprocessing                  (train; inference.bundle)
      bundle/model.safetensors the weights                                    (train; inference.bundle)
      eval-<split>/            metrics.json, predictions.csv, report.html     (analysis.evaluate)
      explain-<split>/         attention.json/.csv, explain.html, thumbs/     (analysis.explain)
      report.html              the run's page                                 (report)

A name written as a literal anywhere else is a second copy of this contract; import it from here.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from cxrlab.errors import CxrlabError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
WANDB_FILE = "wandb.json"
CKPT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
BEST_CKPT = "best.ckpt"
BUNDLE_DIR = "bundle"
META_FILE = "bundle.json"
WEIGHTS_FILE = "model.safetensors"
REPORT_FILE = "report.html"
# inside an evaluation folder
EVAL_METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
SKIPPED_FILE = "skipped.csv"
PER_SOURCE_FILE = "per_source.csv"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability.png"
ROC_PNG = "roc.png"
# inside an explanation folder
ATTENTION_FILE = "attention.json"
ATTENTION_CSV = "attention.csv"
EXPLAIN_HTML = "explain.html"
THUMBS_DIR = "thumbs"


class RunDirError(CxrlabError):
    """A run directory's file exists but cannot be read."""


def checkpoint_path(run_dir: Path, which: str = "last") -> Path:
    """``run_dir/checkpoints/<which>.ckpt`` (``which``: ``last`` or ``best``)."""
    return Path(run_dir) / CKPT_DIR / (LAST_CKPT if which == "last" else BEST_CKPT)


def run_dir_of_checkpoint(ckpt: Path) -> Path:
    """The run a checkpoint belongs to (``runs/<id>/checkpoints/x.ckpt`` -> ``runs/<id>``; else its folder)."""
    return ckpt.parent.parent if ckpt.parent.name == CKPT_DIR else ckpt.parent


def stage_dir(base: Path, stage: str, split: str, data: Path | str | None = None, tail: str = "") -> Path:
    """Where an evaluation or explanation of ``base`` (a run or a bare bundle) goes: ``<stage>-<split>`` on the
    run's own split, ``<stage>-ext-<name of data>`` on other data; ``tail`` marks a variant (``-errors``)."""
    if data is None:
        return Path(base) / f"{stage}-{split}{tail}"
    name = re.sub(r"[^0-9A-Za-z._-]+", "_", Path(data).resolve().stem or "data")
    return Path(base) / f"{stage}-ext-{name}{tail}"


def find_run_dir(target: Path) -> Path | None:
    """The run directory of ``target`` (a run dir, or its bundle/), or None for a bare bundle."""
    t = Path(target)
    for cand in (t, t.parent):
        if (cand / SUMMARY_FILE).is_file() or ((cand / BUNDLE_DIR).is_dir() and (cand / CONFIG_FILE).is_file()):
            return cand
    return None


def read_summary(run_dir: Path | None) -> dict[str, Any]:
    """A run's summary.json ({} for no run or no summary); a damaged one raises RunDirError."""
    if run_dir is None or not (run_dir / SUMMARY_FILE).is_file():
        return {}
    try:
        return json.loads((run_dir / SUMMARY_FILE).read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{run_dir / SUMMARY_FILE} is not valid JSON: {e}") from e


def read_run_config(run_dir: Path | None) -> dict[str, Any]:
    """A run's config.yaml as a plain mapping ({} when absent or unreadable: callers only look up keys)."""
    if run_dir is None or not (Path(run_dir) / CONFIG_FILE).is_file():
        return {}
    import yaml

    try:
        cfg = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text()) or {}
    except yaml.YAMLError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """A run's per-epoch ``metrics.csv`` (``path``: the run directory or the file) as rows in epoch order: floats,
    ``epoch`` and ``step`` as ints, empty cells left out. Rows of one epoch are merged, later values winning
    (Lightning's own CSV logger writes an epoch's train and val values on separate rows; ``cxrlab train`` writes one
    row per epoch). [] when the file is absent, empty or has no ``epoch`` column; a cell that is not a number is
    left out."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        return []
    by_epoch: dict[int, dict[str, float]] = {}
    with p.open(newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, float] = {}
            for k, v in r.items():
                if k is None or v in ("", None):
                    continue
                try:
                    row[k] = int(float(v)) if k in ("epoch", "step") else float(v)
                except (TypeError, ValueError):
                    continue
            if "epoch" in row:
                by_epoch.setdefault(int(row["epoch"]), {}).update(row)
    return [by_epoch[e] for e in sorted(by_epoch)]
