"""Experiment tracking helpers shared by every stage that talks to W&B.

W&B is optional: ``auto`` means online when the user is logged in, offline otherwise (``wandb sync`` later),
and ``off`` disables it. Every W&B directory is pointed inside the run directory unless the user already set
it, so nothing lands in the home directory.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Literal

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


def point_wandb_dirs(base: str | Path) -> Path:
    """Point W&B's directories at ``base/wandb`` unless the user set them; returns the directory used."""
    d = Path(base) / "wandb"
    d.mkdir(parents=True, exist_ok=True)
    for var in WANDB_DIR_VARS:
        os.environ.setdefault(var, str(d))
    return Path(os.environ["WANDB_DIR"])
