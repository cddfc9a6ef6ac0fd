"""CLI command ``cxrlab mine RUN --pool DIR`` (placeholder until cxrlab.mine lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Nothing yet."""
