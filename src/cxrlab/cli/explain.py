"""CLI command ``cxrlab explain RUN_OR_BUNDLE``: Grad-CAM table + attention scores (see ``cxrlab.analysis.explain``)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cxrlab.analysis.configs import ExplainConfig
from cxrlab.cli.options import from_field

console = Console()
err_console = Console(stderr=True)


def _f(v: object) -> str:
    return "–" if not isinstance(v, int | float) or not math.isfinite(float(v)) else f"{float(v):.3f}"


def explain_cmd(
    target: Path = typer.Argument(..., help="Run directory (runs/<id>) or model bundle directory.", show_default=False),
    split: str = from_field(ExplainConfig, "split", "--split"),
    only_errors: bool = from_field(ExplainConfig, "only_errors", "--only-errors"),
    method: str = from_field(ExplainConfig, "method", "--method"),
    cam_target: str = from_field(ExplainConfig, "cam_target", "--cam-target"),
    target_layer: str | None = from_field(ExplainConfig, "target_layer", "--target-layer"),
    data: Path | None = from_field(ExplainConfig, "data", "--data"),
    out: Path | None = from_field(ExplainConfig, "out", "--out"),
    batch_size: int = from_field(ExplainConfig, "batch_size", "--batch-size"),
    max_images: int | None = from_field(ExplainConfig, "max_images", "--max-images"),
    device: str = from_field(ExplainConfig, "device", "--device"),
    no_wandb: bool = typer.Option(False, "--no-wandb", help="Do not add the table to the run's W&B run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Grad-CAM for every image of a split, attention in the lungs / on burned-in text / on the border, and a
    sortable, filterable HTML table (explain.html) with overlays, scores and errors."""
    from cxrlab.analysis.explain import explain
    from cxrlab.config import build_config

    cfg = build_config(
        ExplainConfig,
        {
            "target": target,
            "split": split,
            "data": data,
            "only_errors": only_errors,
            "method": method,
            "cam_target": cam_target,
            "target_layer": target_layer,
            "out": out,
            "batch_size": batch_size,
            "max_images": max_images,
            "device": device,
            "wandb": "off" if no_wandb else "auto",
            "progress": not quiet,
        },
        source="command line",
    )
    res = explain(cfg)
    for s in res.skipped:
        err_console.print(f"[yellow]skipped[/] {s['path']}: {s['reason']}")
    t = Table(
        title=f"Mean share of Grad-CAM attention ({res.method} on {res.target_layer}, {res.n_images} images)",
        title_justify="left",
    )
    # in lungs / on text / on border: mean share of the CAM mass; text%: images with detected text;
    # text|w: on text averaged over those images only
    for col in ("group", "n", "acc", "lungs", "text", "border", "text%", "text|w"):
        t.add_column(col, justify="left" if col == "group" else "right")
    groups = [("all", res.summary), *res.per_class.items()]
    for name, s in groups:
        if not s:
            continue
        t.add_row(
            name,
            str(s.get("n_images", 0)),
            _f(s.get("accuracy")),
            _f(s.get("in_lungs")),
            _f(s.get("on_text")),
            _f(s.get("on_border")),
            _f(s.get("with_text")),
            _f(s.get("on_text_where_text")),
        )
    console.print(t)
    if res.n_images == 0:
        console.print("[yellow]nothing to explain[/] (no misclassified images)" if only_errors else "no images")
    console.print(f"HTML table:  {res.html}")
    console.print(f"attention:   {res.attention_json}  (per image: {res.attention_csv})")
    if res.wandb_logged:
        console.print("W&B:         table added to the run's W&B run")
    console.print(f"[dim]{res.n_seen} images read, {len(res.skipped)} unreadable, {res.seconds:.1f} s[/]")


def register(app: typer.Typer) -> None:
    """Add ``explain`` to the root app (idempotent: main() may be called more than once)."""
    if any(c.callback is explain_cmd for c in app.registered_commands):
        return
    app.command("explain")(explain_cmd)
