"""CLI command ``cxrlab sweep``: run a W&B-format sweep file with Optuna (default) or W&B.

Thin: parse options, build ``SweepConfig``, call ``cxrlab.sweep.runner.sweep``, print the summary table, the best
trial and where the files are. Several copies of the same command (same ``--storage``) share the work.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cxrlab.cli.options import from_field
from cxrlab.sweep.spec import SweepConfig

console = Console()


def sweep_cmd(
    sweep_file: Path = typer.Argument(
        ..., help="W&B sweep YAML (method, metric, parameters), e.g. configs/sweep.yaml", show_default=False
    ),
    config: Path | None = from_field(SweepConfig, "base_config", "--config", "-c"),
    data: str | None = from_field(SweepConfig, "data", "--data", "-d"),
    storage: str | None = from_field(
        SweepConfig, "storage", "--storage", note="Shared by all workers, e.g. postgresql://user:pw@host/db."
    ),
    n_trials: int | None = from_field(SweepConfig, "n_trials", "--n-trials", "-n"),
    backend: str = from_field(SweepConfig, "backend", "--backend", note="optuna needs no server; wandb does."),
    overrides: list[str] = from_field(
        SweepConfig,
        "overrides",
        "--set",
        "-s",
        note="Repeatable, several may follow one --set (e.g. --set tracking.wandb=off trainer.limit_train_batches=2).",
    ),
    out: Path = from_field(SweepConfig, "out", "--out", "-o"),
    name: str | None = from_field(SweepConfig, "name", "--name"),
    retry_failed: bool = from_field(SweepConfig, "retry_failed", "--retry-failed"),
    seed: int | None = from_field(SweepConfig, "seed", "--seed"),
    keep: str = from_field(SweepConfig, "keep", "--keep"),
    extra: list[str] | None = typer.Argument(None, hidden=True),
) -> None:
    """Run a hyper-parameter sweep; re-running the same command resumes it, several copies share it."""
    from cxrlab.config import ConfigError, build_config
    from cxrlab.sweep.outputs import summary_table
    from cxrlab.sweep.runner import sweep

    overrides = [*overrides, *(extra or [])]
    bad = [s for s in overrides if "=" not in s]
    if bad:
        raise ConfigError(f"unexpected argument(s) {bad}: overrides look like key=value (e.g. --set epochs=3)")
    cfg = build_config(
        SweepConfig,
        {
            "sweep_file": sweep_file,
            "base_config": config,
            "data": data,
            "storage": storage,
            "n_trials": n_trials,
            "backend": backend,
            "overrides": overrides,
            "out": out,
            "name": name,
            "retry_failed": retry_failed,
            "seed": seed,
            "keep": keep,
        },
        source="command line",
    )
    res = sweep(cfg)
    # Piped/CI output has no terminal width; give the wide table room instead of folding every cell.
    out_console = console if console.is_terminal else Console(width=max(console.width, 200))
    out_console.print(summary_table(res))
    if res.constants:
        out_console.print("constants: " + ", ".join(f"{k}={v}" for k, v in res.constants.items()))
    if res.best:
        b = res.best
        params = ", ".join(f"{k}={v}" for k, v in b["params"].items())
        out_console.print(f"[bold green]best[/]: trial {b['trial']} ({params}) {res.metric} = {b['objective']:.4f}")
        if b["run_dir"]:
            out_console.print(f"  run: {b['run_dir']}")
    if res.failed:
        which = ", ".join(str(r["trial"]) for r in res.failed)
        out_console.print(f"[red]{len(res.failed)} failed trial(s)[/]: {which} (reasons in the table and logs/)")
    pruned = [r for r in res.rows if r["status"] == "PRUNED"]
    if pruned:
        which = ", ".join(str(r["trial"]) for r in pruned)
        out_console.print(f"[magenta]{len(pruned)} trial(s) pruned early[/] (hyperband): {which}")
    if res.importances:
        imp = ", ".join(f"{k} {v:.2f}" for k, v in res.importances.items())
        out_console.print(f"parameter importance ({res.importance_note}): {imp}")
    elif res.importance_note:
        out_console.print(f"[dim]{res.importance_note}[/]")
    state = "complete" if res.complete else f"{res.pending} to run, {res.running_elsewhere} running elsewhere"
    out_console.print(f"ran {len(res.ran_here)} trial(s) here; sweep {state}; storage {res.storage}")
    freed = f" ({res.freed_bytes / 1e6:.1f} MB of checkpoints freed, --keep {cfg.keep})" if res.freed_bytes else ""
    out_console.print(f"disk: {res.disk_bytes / 1e6:.1f} MB in {res.sweep_dir}{freed}")
    out_console.print(f"table: {res.summary_csv}\nplot:  {res.plot_html}")
    if not res.best and res.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``sweep`` to the root app (idempotent: main() may be called more than once)."""
    if any(c.name == "sweep" for c in app.registered_commands):
        return
    app.command("sweep")(sweep_cmd)
