"""A training run's directory over its life: a new run id and folder, the per-epoch ``metrics.csv`` logger (its
reader is ``cxrlab.runs.read_metrics``), finding what to resume from (``last.ckpt``, falling back to
``best.ckpt``) and with which config, and the bytes a run holds. File names come from ``cxrlab.runs``."""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrlab.atomic import atomic_open
from cxrlab.config import Config, ConfigError, build_config, read_yaml
from cxrlab.errors import RunError
from cxrlab.inference.bundle import CheckpointError, read_checkpoint
from cxrlab.runs import (
    BUNDLE_DIR,
    CKPT_DIR,
    CONFIG_FILE,
    WEIGHTS_FILE,
    checkpoint_path,
    run_dir_of_checkpoint,
)
from cxrlab.runs import read_metrics as read_metrics  # re-exported: the reader lives in cxrlab.runs

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- metrics.csv


def epoch_csv_logger(path: Path) -> Any:
    """A Lightning logger writing ``metrics.csv`` with one row per epoch (train and val merged on ``epoch``).

    Lightning's CSVLogger writes one row per log call (train and val of one epoch on separate rows); this one keeps
    the row of each epoch and rewrites the (small) file after every call, so a crashed run keeps its history. On
    resume, rows of epochs that are not run again are kept; an epoch that is run again replaces its row.
    """
    from lightning.pytorch.loggers.logger import Logger
    from lightning.pytorch.utilities import rank_zero_only

    class EpochCSVLogger(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.path = path
            self.rows: dict[int, dict[str, Any]] = {}
            self._touched: set[int] = set()
            for r in read_metrics(path):  # a resumed run: its earlier epochs
                self.rows[int(r["epoch"])] = dict(r)

        @property
        def name(self) -> str:
            return "metrics_csv"

        @property
        def version(self) -> str:
            return "0"

        @rank_zero_only
        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        @rank_zero_only
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if "epoch" not in metrics:
                return
            values = {k: float(v) for k, v in metrics.items() if k.startswith(("train/", "val/"))}
            if not values:
                return
            epoch = int(metrics["epoch"])
            if epoch not in self._touched:  # first values of this epoch in this session: start the row afresh
                self._touched.add(epoch)
                self.rows[epoch] = {"epoch": epoch}
            self.rows[epoch].update(values)
            self.rows[epoch]["step"] = step

        @rank_zero_only
        def save(self) -> None:
            if not self.rows:
                return
            keys = sorted({k for r in self.rows.values() for k in r} - {"epoch", "step"})
            cols = ["epoch", "step"] + sorted(keys, key=lambda k: (not k.startswith("train/"), k))
            with atomic_open(self.path, "w", newline="") as f:  # a crash mid-write keeps the previous file
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                for e in sorted(self.rows):
                    w.writerow(self.rows[e])

        @rank_zero_only
        def finalize(self, status: str) -> None:
            self.save()

    return EpochCSVLogger()


# ------------------------------------------------------------------------------------------- run dirs


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def new_run_dir(cfg: Config) -> tuple[Path, str]:
    """``<output_dir>/<run_name or model-YYYYmmdd-HHMMSS>``; a taken name gets a ``-2``, ``-3`` ... suffix."""
    base = safe_name(cfg.run_name or f"{cfg.model_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    parent = Path(cfg.output_dir).expanduser()
    run_id, n = base, 1
    while (parent / run_id).exists() and any((parent / run_id).iterdir()):
        n += 1
        run_id = f"{base}-{n}"
    run_dir = parent / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir.resolve(), run_id


def locate_resume(resume: str | Path) -> tuple[Path, Path]:
    """A run directory or a checkpoint inside one -> (run_dir, checkpoint path)."""
    p = Path(resume).expanduser()
    if p.is_file() and p.suffix == ".ckpt":
        run_dir = run_dir_of_checkpoint(p)
        ckpt = p
    elif p.is_dir():
        run_dir, ckpt = p, checkpoint_path(p, "last")
    else:
        raise RunError(f"cannot resume: {p} is neither a run directory nor a .ckpt file")
    if not ckpt.is_file():
        raise RunError(f"cannot resume {run_dir}: {ckpt} not found (the run saved no checkpoint before it stopped)")
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunError(f"cannot resume: {run_dir} has no {CONFIG_FILE}; pass the run directory made by `cxrlab train`")
    return run_dir.resolve(), ckpt.resolve()


def _unreadable_checkpoint(path: Path) -> str | None:
    """None when ``path`` loads as a Lightning checkpoint (``weights_only``, as Lightning will load it), else why not,
    in one line."""
    try:
        read_checkpoint(path, lightning=True)
    except CheckpointError as e:
        return e.reason
    return None


def resume_checkpoint(run_dir: Path, ckpt: Path, explicit: bool = False) -> tuple[Path, str | None]:
    """The checkpoint to resume ``run_dir`` from and a warning (or None).

    A damaged ``last.ckpt`` (a crash or a full disk while it was written) falls back to ``best.ckpt`` when that one
    loads, with a warning: the epochs after best are trained again. Otherwise ``RunError`` says exactly what to do.
    ``explicit``: the user named ``ckpt`` (no silent fallback then; the message names the alternative).
    """
    why = _unreadable_checkpoint(ckpt)
    if why is None:
        return ckpt, None
    best = checkpoint_path(run_dir, "best")
    best_ok = best.is_file() and best.resolve() != ckpt.resolve() and _unreadable_checkpoint(best) is None
    restart = f"cxrlab train --config {run_dir / CONFIG_FILE} (a new run from the stored config)"
    if best_ok and not explicit:
        epoch = int(read_checkpoint(best, lightning=True)["epoch"])
        msg = (
            f"{ckpt} is damaged ({why}); resuming from {best} (epoch {epoch}) instead: the epochs after it are "
            "trained again"
        )
        log.warning(msg)
        return best, msg
    if best_ok:
        raise RunError(
            f"cannot resume from {ckpt}: it is damaged ({why}). Resume from the best checkpoint instead: "
            f"cxrlab train --resume {best}, or start again: {restart}"
        )
    if best.is_file() and best.resolve() != ckpt.resolve():
        other = f"{best} is damaged too"
    else:
        other = "there is no best.ckpt to fall back to"
    raise RunError(
        f"cannot resume {run_dir}: {ckpt} is damaged ({why}) and {other}. Start again: {restart}; then remove {run_dir}"
    )


def resume_config(resume: str | Path, overrides: Sequence[str] | None = None) -> Config:
    """The stored config of a run (``runs/<id>/config.yaml``) plus ``key=value`` overrides (e.g. more epochs)."""
    from cxrlab.config import apply_overrides

    run_dir, _ = locate_resume(resume)
    data = apply_overrides(read_yaml(run_dir / CONFIG_FILE), list(overrides or []))
    return build_config(Config, data, source=str(run_dir / CONFIG_FILE))


def check_resume_compatible(cfg: Config, run_dir: Path) -> None:
    stored = read_yaml(run_dir / CONFIG_FILE)
    for key in ("model_name", "in_chans", "img_size", "num_classes"):
        mine = getattr(cfg, key)
        if key == "img_size":
            mine = list(mine)
        if mine is not None and stored.get(key) is not None and stored.get(key) != mine:
            raise ConfigError(
                f"cannot resume {run_dir} with {key}={mine!r}: the run was trained with {key}={stored[key]!r} "
                f"(resume with the stored config: `cxrlab train --resume {run_dir}`)"
            )


def disk_usage(path: str | Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            total += 0 if stat.S_ISLNK(st.st_mode) else st.st_size
    return total


def apply_keep(run_dir: Path, keep: str) -> None:
    """Retention of a finished run (``Config.keep``): last = delete ``best.ckpt`` (its weights are the bundle's),
    bundle = delete ``checkpoints/``, all = keep both. Only once the bundle is on disk."""
    if keep == "all" or not (run_dir / BUNDLE_DIR / WEIGHTS_FILE).is_file():
        return
    if keep == "bundle":
        shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)
    else:
        checkpoint_path(run_dir, "best").unlink(missing_ok=True)
