"""CLI commands about sources and shift: ``cxrlab validate`` and ``cxrlab fit-shift``.

Thin: parse options, call the stage function, print a rich summary.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cxrlab.analysis.configs import ValidateConfig
from cxrlab.cli.options import comma_list, from_field
from cxrlab.inference.settings import PredictSettings

console = Console()
err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app (idempotent: main() may be called more than once)."""
    have = {c.callback for c in app.registered_commands}
    for name, fn in (("validate", validate_cmd), ("fit-shift", fit_shift_cmd)):
        if fn not in have:
            app.command(name)(fn)


def fit_shift_cmd(
    target: Path = typer.Argument(..., help="Run or bundle directory.", show_default=False),
    data: Path | None = typer.Option(None, "--data", help="Split directory [default: the run's training split]."),
    device: str = from_field(PredictSettings, "device", "--device"),
) -> None:
    """Store the label-shift and out-of-distribution statistics in a bundle (validation confusion matrix, training
    prior, feature mean/covariance, thresholds). `train` does this itself; use this for older bundles."""
    from cxrlab.analysis.shift_fit import fit_bundle

    meta = fit_bundle(target, data, device)
    o = meta["ood"]
    console.print(
        f"[bold]fit-shift[/]: {meta['n_train']} training / {meta['n_val']} validation images; feature distance "
        f"threshold {o['threshold']:.2f} (split-conformal, images like the training images flagged at most "
        f"{o['expected_flag_rate']:.1%}), {o['feature_dim']} features, Ledoit-Wolf shrinkage {o['shrinkage']:.3f}; "
        f"polarity threshold {meta.get('polarity_threshold', 0):.2f}"
    )


def validate_cmd(
    manifest: Path = typer.Argument(
        ..., help="manifest.csv (or its folder) from `cxrlab data ingest`, with a source per image.", show_default=False
    ),
    out: Path = from_field(ValidateConfig, "out", "--out", "-o"),
    config: Path | None = from_field(ValidateConfig, "config", "--config", "-c"),
    set_: list[str] = from_field(ValidateConfig, "overrides", "--set", note="Repeatable."),
    holdout: list[str] = typer.Option(
        [],
        "--holdout",
        help="A group of sources held out together, comma-separated (repeatable) [default: every source alone].",
    ),
    fractions: str = from_field(ValidateConfig, "fractions", "--fractions", to_cli=comma_list),
    seed: int = from_field(ValidateConfig, "split_seed", "--seed"),
    n_boot: int = from_field(ValidateConfig, "n_boot", "--n-boot"),
    progress: bool = from_field(ValidateConfig, "progress", "--progress/--no-progress"),
) -> None:
    """Leave-source-out validation: one model per held-out source group, trained on the other sources; its
    in-distribution test metrics next to its metrics on the unseen sources, per fold and pooled (resumable)."""
    from cxrlab.analysis.validate import TABLE_COLUMNS, table_cells, validate
    from cxrlab.config import ConfigError, build_config

    try:
        fr = tuple(float(x) for x in fractions.split(","))
    except ValueError:
        raise ConfigError(f"--fractions {fractions!r} must be three numbers like 0.8,0.1,0.1") from None
    groups = [[s.strip() for s in g.split(",") if s.strip()] for g in holdout]
    cfg = build_config(
        ValidateConfig,
        {
            "manifest": manifest,
            "out": out,
            "config": config,
            "overrides": list(set_),
            "groups": groups,
            "fractions": fr,
            "split_seed": seed,
            "n_boot": n_boot,
            "progress": progress,
        },
        source="cxrlab validate",
    )
    res = validate(cfg, log=console.print)
    t = Table(title="leave-source-out validation (95% CI)", title_justify="left")
    for c in TABLE_COLUMNS:
        t.add_column(c, justify="left" if c in ("held out", "test recall", "held-out recall") else "right")
    for r in res.rows.to_dict(orient="records"):
        t.add_row(*table_cells(r, res.classes))
    console.print(t)
    for f in res.folds:
        if f["status"] == "skipped":
            err_console.print(f"[yellow]fold {f['fold']} skipped:[/] {f['reason']}")
        for side, ws in (f.get("warnings") or {}).items():
            for w in ws:
                err_console.print(f"[bold red]fold {f['fold']}, {side}:[/] {w}")
    console.print(f"report: {res.paths['html']}  table: {res.paths['csv']}")
