"""CLI commands about sources and shift: ``cxrlab fit-shift`` (and ``cxrlab validate``).

Thin: parse options, call the stage function, print a rich summary.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app (idempotent: main() may be called more than once)."""
    have = {c.callback for c in app.registered_commands}
    for name, fn in (("fit-shift", fit_shift_cmd),):
        if fn not in have:
            app.command(name)(fn)


def fit_shift_cmd(
    target: Path = typer.Argument(..., help="Run or bundle directory.", show_default=False),
    data: Path | None = typer.Option(None, "--data", help="Split directory [default: the run's training split]."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
) -> None:
    """Store the label-shift and out-of-distribution statistics in a bundle (validation confusion matrix, training
    prior, feature mean/covariance, thresholds). `train` does this itself; use this for older bundles."""
    from cxrlab.shift import fit_bundle

    meta = fit_bundle(target, data, device)
    o = meta["ood"]
    console.print(
        f"[bold]fit-shift[/]: {meta['n_train']} training / {meta['n_val']} validation images; feature distance "
        f"threshold {o['threshold']:.2f} ({o['quantile']:.0%} of validation), {o['feature_dim']} features, "
        f"Ledoit-Wolf shrinkage {o['shrinkage']:.3f}; polarity threshold {meta.get('polarity_threshold', 0):.2f}"
    )
