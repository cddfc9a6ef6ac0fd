"""Experiment tracking helpers shared by every stage that talks to W&B.

W&B is optional: ``auto`` means online when the user is logged in, offline otherwise (``wandb sync`` later),
and ``off`` disables it. Every W&B directory is pointed inside the run directory unless the user already set
it, so nothing lands in the home directory.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

WandbMode = Literal["online", "offline", "disabled"]
WANDB_DIR_VARS = ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL_HOST", "api.wandb.ai"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return auth is not None


def resolve_wandb_mode(setting: str) -> WandbMode:
    """Map the config's ``tracking.wandb`` (auto|online|offline|off) to a wandb mode.

    ``WANDB_MODE`` in the environment wins over ``auto`` (so CI and tests can force offline).
    """
    if setting == "off":
        return "disabled"
    if setting in ("online", "offline"):
        return setting  # type: ignore[return-value]
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("online", "offline", "disabled"):
        return env  # type: ignore[return-value]
    if env in ("dryrun",):
        return "offline"
    return "online" if _logged_in() else "offline"


@contextmanager
def wandb_dirs(base: str | Path) -> Iterator[Path]:
    """``point_wandb_dirs(base)`` for the duration of a block, then the environment as it was.

    Several runs in one process (tests, sweeps) each keep their W&B files in their own run directory instead of
    all following the first run's directory.
    """
    saved = {var: os.environ.get(var) for var in WANDB_DIR_VARS}
    try:
        yield point_wandb_dirs(base)
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def point_wandb_dirs(base: str | Path) -> Path:
    """Point W&B's directories at ``base/wandb`` unless the user set them; returns the directory used."""
    d = Path(base) / "wandb"
    d.mkdir(parents=True, exist_ok=True)
    for var in WANDB_DIR_VARS:
        os.environ.setdefault(var, str(d))
    return Path(os.environ["WANDB_DIR"])


def tracked_run_info(run_dir: str | Path, summary: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Id, mode, project and entity of a run directory's W&B run, or None when it was not tracked.

    ``train`` writes ``wandb.json`` = {id, mode} into the run directory; ``summary.json``'s ``wandb_run_id`` /
    ``wandb_dir`` (``...-<id>``) and ``wandb_mode`` are the fallback. Later stages (evaluate, explain) resume that
    run with ``resume="allow"`` in the same mode to add their results.
    """
    import json

    from cxrlab.runs import WANDB_FILE, read_run_config

    run_dir = Path(run_dir)
    summary = summary or {}
    info: dict[str, Any] = {}
    wj = run_dir / WANDB_FILE
    if wj.is_file():
        try:
            info = json.loads(wj.read_text())
        except json.JSONDecodeError:
            info = {}
    mode = str(info.get("mode") or summary.get("wandb_mode") or "")
    run_id = info.get("id") or summary.get("wandb_run_id")
    if not run_id and summary.get("wandb_dir"):
        run_id = Path(str(summary["wandb_dir"])).name.rsplit("-", 1)[-1]  # offline-run-<time>-<id>
    if not run_id or mode in ("", "disabled"):
        return None
    cfg = read_run_config(run_dir)
    tracking = cfg.get("tracking") if isinstance(cfg.get("tracking"), dict) else {}
    return {
        "id": str(run_id),
        "mode": mode if mode in ("online", "offline") else "offline",
        "project": summary.get("project") or cfg.get("project") or "cxr-classification",
        "entity": tracking.get("entity"),
    }


@contextmanager
def resumed_run(run_dir: str | Path, info: dict[str, Any], job_type: str) -> Iterator[Any]:
    """Resume a run directory's W&B run (``info`` from ``tracked_run_info``: same id, project, mode) so a later
    stage (evaluate, explain) can add its results; the run is finished when the block ends."""
    import wandb

    with wandb_dirs(run_dir):
        run = wandb.init(
            id=info["id"],
            project=info["project"],
            entity=info["entity"],
            resume="allow",
            mode=info["mode"],
            dir=str(run_dir),
            job_type=job_type,
            settings=wandb.Settings(silent=True, console="off"),
        )
        try:
            yield run
        finally:
            run.finish()
