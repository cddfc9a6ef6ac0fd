"""CLI command ``cxrlab train``: load the config (+ ``--set`` overrides), call ``cxrlab.training.train.train``, print a
summary.

The stage module is imported inside the command so ``--help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cxrlab.cli.options import from_field
from cxrlab.config import Config

console = Console()
err_console = Console(stderr=True)

HELP = (
    "Train a classifier on a split (from `cxrlab data split`) and write a run directory.\n\n"
    "The run directory (runs/<run-id>/ by default) holds config.yaml, metrics.csv (one row per epoch), "
    "checkpoints/best.ckpt (max val/f1_macro) + last.ckpt, the model bundle bundle/ (safetensors + JSON: what "
    "evaluate, predict and serve load) and summary.json. W&B: online when logged in, offline otherwise (sync later "
    "with `wandb sync`), off with --set tracking.wandb=off.\n\n"
    "Examples:\n\n"
    "  cxrlab train --config configs/cpu.yaml --data /tmp/tiny-split\n"
    "  cxrlab train -c configs/baseline.yaml -d SPLIT --set epochs=5 --set augment.hflip_p=0\n"
    "  cxrlab train -c configs/challenger.yaml -d SPLIT --set trainer.limit_train_batches=2 epochs=1\n"
    "  cxrlab train --resume runs/RUN_ID   (continue an interrupted run)"
)


def register(app: typer.Typer) -> None:
    """Add ``train`` to the root app (idempotent: main() may be called more than once)."""
    if any(c.name == "train" for c in app.registered_commands):
        return
    app.command("train", help=HELP, no_args_is_help=False)(train_cmd)


def train_cmd(
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="YAML config (configs/baseline.yaml, challenger.yaml, cpu.yaml).",
        show_default=False,
    ),
    data: str | None = from_field(Config, "data", "--data", "-d", note="Overrides `data:` in the config."),
    overrides: list[str] | None = typer.Option(
        None,
        "--set",
        "-s",
        help="key=value override with dotted keys, repeatable; several may follow one --set "
        "(e.g. --set epochs=3 img_size=[224,224] trainer.limit_train_batches=2).",
        show_default=False,
    ),
    resume: str | None = typer.Option(
        None,
        "--resume",
        help="Continue an interrupted run: its directory or a checkpoint in it. Uses the run's stored config "
        "(--set may change e.g. epochs); --config is not needed.",
        show_default=False,
    ),
    extra: list[str] | None = typer.Argument(None, hidden=True),
) -> None:
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a busy machine (other processes
    # on the same cores) spinning threads burn the time slices their partner needs: lite0 training with 2 threads
    # ran 2-3x slower spinning than with PASSIVE (up to 5x in benchmarks/bench_train.py); on an idle machine
    # PASSIVE costs ~9%. A value set by the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from cxrlab.config import ConfigError, load_config
    from cxrlab.training.rundir import resume_config
    from cxrlab.training.train import train

    sets = [*(overrides or []), *(extra or [])]
    bad = [s for s in sets if "=" not in s]
    if bad:
        raise ConfigError(f"unexpected argument(s) {bad}: overrides look like key=value (e.g. --set epochs=3)")
    if data is not None:
        sets.append(f"data={data}")
    if resume is not None:
        cfg = load_config(config, sets) if config else resume_config(resume, sets)
        console.print(f"[bold]resuming[/] {resume}")
    else:
        cfg = load_config(config, sets)
    result = train(cfg, resume=resume)
    _print_summary(result)
    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/] {w}")


def _print_summary(r) -> None:  # r: cxrlab.training.train.RunResult
    t = Table(title=f"run {r.run_id}", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("best epoch", f"{r.best_epoch} (of 0..{r.epochs_run - 1}; best val/f1_macro {r.best_score:.4f})")
    for k in ("val/f1_macro", "val/accuracy", "val/precision_macro", "val/recall_macro"):
        if k in r.metrics:
            t.add_row(k, f"{r.metrics[k]:.4f}")
    for c in r.class_names:
        if f"val/recall_{c}" in r.metrics:
            t.add_row(f"val/recall_{c}", f"{r.metrics[f'val/recall_{c}']:.4f}")
    test = {k: v for k, v in r.metrics.items() if k.startswith("test/")}
    for k in ("test/f1_macro", "test/accuracy", *[f"test/recall_{c}" for c in r.class_names]):
        if k in test:
            t.add_row(k, f"[bold]{test[k]:.4f}[/]" if k == "test/f1_macro" else f"{test[k]:.4f}")
    t.add_row("run dir", str(r.run_dir))
    t.add_row("bundle", str(r.bundle_dir))
    t.add_row("data", f"{r.data} ({r.dataset_version})")
    t.add_row("wall time", f"{r.wall_s:.0f} s")
    if r.disk_bytes:
        t.add_row("disk used", f"{r.disk_bytes / 1e6:.1f} MB")
    if r.wandb_dir:
        t.add_row(f"W&B ({r.wandb_mode})", str(r.wandb_dir))
    if r.wandb_sync:
        t.add_row("sync W&B", r.wandb_sync)
    if r.skipped_images:
        t.add_row("skipped images", f"{len(r.skipped_images)} unreadable (see summary.json)")
    console.print(t)
