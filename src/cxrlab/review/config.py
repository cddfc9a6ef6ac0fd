"""Configs of the review loop: which run is reviewed (``ReviewConfig``), its export (``ExportConfig``) and the web
app's settings (``ReviewSettings``).

Apart from ``cxrlab.review.core`` / ``app`` (pandas, FastAPI) so the command line builds its options from them,
defaults and help included, without importing the service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from cxrlab.config import StrictModel


class ReviewConfig(StrictModel):
    """Which run's explained images are reviewed, in which order, and where answers go."""

    run: Path = Field(description="run directory (runs/<id>) or bundle directory that `cxrlab explain` wrote into")
    split: Literal["test", "val", "train"] = Field("test", description="the explained split: test|val|train")
    explain_dir: Path | None = Field(None, description="explain output folder (default <run>/explain-<split>)")
    db: str | None = Field(
        None,
        description="answers database: a SQLite path or SQLAlchemy URL (default <run>/review/review.db), or "
        "postgresql://user@host/db for a team of readers",
    )
    sample: int = Field(40, ge=0, description="correct predictions added after the errors (stratified by class)")
    seed: int = Field(0, description="seed of the stratified sample")


class ExportConfig(ReviewConfig):
    """Review export: answers CSV, agreement numbers, relabel manifest."""

    out: Path | None = Field(None, description="export folder (default <run>/review)")
    cam_overlap: bool = Field(True, description="recompute Grad-CAM on images with drawn regions (needs the bundle)")
    device: str = "cpu"


class ReviewSettings(StrictModel):
    """Settings of ``cxrlab review`` (also accepted by ``create_review_app``)."""

    host: str = Field("127.0.0.1", description="interface to bind; keep loopback unless behind a proxy with TLS")
    port: int = Field(8010, ge=0, le=65535)
    token: str | None = Field(None, description="require 'Authorization: Bearer TOKEN' on /api (the page asks for it)")
    reader: str = Field("", description="reader name the page starts with (each reader may change it)")
