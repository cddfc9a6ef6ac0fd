"""Hyper-parameter sweeps from a W&B sweep YAML, run locally (Optuna, no server) or on many machines.

``sweep(SweepConfig) -> SweepResult`` reads the W&B sweep file format unchanged (``method``, ``metric``,
``parameters`` with ``values`` / ``value`` / ``distribution`` + ``min`` / ``max`` / ``q`` / ..., dotted keys or
W&B's nested ``parameters:`` form) and runs each trial as an ordinary ``train()`` run whose config is the
base config plus the trial's parameters as overrides.

Backends
- ``optuna`` (default): the study lives in an RDB storage, by default ``sqlite:///<sweep dir>/study.db``;
  ``--storage postgresql://...`` lets workers on many machines run the same command against one study.
  grid -> every point of the grid, each once across all workers, random -> ``RandomSampler``, bayes ->
  ``TPESampler``. How points are claimed and dead workers found: ``cxrlab.sweep.optuna_backend``.
- ``wandb``: registers the same YAML with ``wandb.sweep`` and runs ``wandb.agent`` with the same trial function
  (needs a W&B server; offline it fails with a message pointing back to the optuna backend).

A trial that raises (bad parameter, invalid model name, out of memory, NaN loss), or whose objective is
missing or not finite, is recorded as FAILED with its reason (trial user attribute ``cxrlab_reason``; full
traceback in ``logs/<sweep>-t<NNN>.txt``) and the sweep goes on. Hard failures are not re-run unless
``retry_failed``; interrupted trials (Ctrl-C, killed worker) always are.

Trial config = base YAML -> ``evaluate=test`` and ``tracking.group=<sweep>`` (so the table has test metrics
and W&B groups the trials; ``--set`` can change both) -> ``--data`` -> ``--set`` overrides -> the YAML's
constants and the trial's parameters -> ``output_dir=<sweep dir>/runs``, ``run_name=<sweep>-t<NNN>``.
The objective is the YAML's metric from ``RunResult.metrics`` (the best epoch's), else the best epoch value in
the run's ``metrics.csv``. Sweep size: grid = every point; random/bayes = ``run_cap`` from the YAML, else
``n_trials``; ``n_trials`` also caps how many trials one command runs.

Outputs in ``<out>/<name>/``: ``study.db`` (default storage), ``runs/`` (one run directory per trial),
``summary.csv`` (one row per trial of the whole study, from ``study.trials_dataframe()``),
``parallel_coordinates.html`` (self-contained plotly: plotly.js inlined, so it opens offline),
``best.json``, ``logs/`` (tracebacks of failed trials).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrlab.sweep.importance import param_importances
from cxrlab.sweep.optuna_backend import OptunaSweep, redact_url
from cxrlab.sweep.outputs import apply_retention, best_row, failed_rows, trial_rows, write_outputs
from cxrlab.sweep.spec import SweepConfig, SweepError, SweepSpec, check_param_keys, flatten_params, parse_sweep_spec
from cxrlab.sweep.trial import SweepResult, TrainFn, TrialRunner, short_error

if TYPE_CHECKING:
    from rich.console import Console


# -------------------------------------------------------------------------------------- wandb backend


def _run_wandb(
    cfg: SweepConfig, spec: SweepSpec, name: str, sweep_dir: Path, runner: TrialRunner, console: Any
) -> tuple[list[dict[str, Any]], list[int]]:
    from cxrlab.tracking import resolve_wandb_mode

    mode = resolve_wandb_mode(runner.base_cfg.tracking.wandb)
    if mode != "online":
        raise SweepError(
            f"W&B sweeps need a W&B server, and W&B is {mode} here (not logged in, WANDB_MODE={mode}, or "
            "tracking.wandb set). Use the default optuna backend, which needs no server: drop --backend wandb "
            "(trials still log to W&B offline; `wandb sync` them later)"
        )
    import wandb

    raw = dict(spec.raw)  # the user's YAML as written; only a missing name/metric is filled in
    raw.setdefault("name", name)
    raw.setdefault("metric", {"name": spec.metric, "goal": spec.goal})
    project, entity = runner.base_cfg.project, runner.base_cfg.tracking.entity
    try:
        sweep_id = wandb.sweep(sweep=raw, project=project, entity=entity)
    except Exception as e:
        raise SweepError(f"W&B refused the sweep: {short_error(e)}") from e
    rows: list[dict[str, Any]] = []
    keys = {p.key for p in spec.params}

    def trial() -> None:
        # The agent's run carries the parameters; train()'s WandbLogger attaches to it (and finishes it).
        with wandb.init(group=name, job_type="sweep-trial") as run:
            params = flatten_params(dict(run.config), keys=keys)
            params = {k: v for k, v in params.items() if k in keys and k not in spec.constants}
            n = len(rows)
            out = runner(params, f"t{n:03d}-{run.id}")
            with contextlib.suppress(Exception):  # the run may already be finished by train()
                run.summary.update({"sweep/status": out.state, "sweep/reason": out.reason})
            rows.append(
                {
                    "trial": n,
                    "status": "COMPLETE" if out.state == "COMPLETE" else "FAILED",
                    "params": params,
                    "objective": out.value,
                    "metrics": out.metrics,
                    "reason": out.reason,
                    "run_dir": out.run_dir,
                    "worker": f"wandb:{run.id}",
                    "duration_s": round(out.duration_s, 2),
                    "point": json.dumps(params, sort_keys=True, default=str),
                }
            )
            if console:
                console.print(f"[bold cyan]sweep {name}[/] W&B run {run.id}: {out.state} {out.value} {out.reason}")

    from cxrlab.tracking import wandb_dirs

    with wandb_dirs(sweep_dir):
        wandb.agent(sweep_id, function=trial, count=cfg.n_trials, project=project, entity=entity)
    return rows, [r["trial"] for r in rows]


# ---------------------------------------------------------------------------------------------- main


def _default_train() -> TrainFn:
    try:
        from cxrlab.training.train import train
    except ImportError as e:
        raise SweepError(f"the training stage (cxrlab.training.train) is not available: {e}") from e
    return train


def sweep(cfg: SweepConfig, train_fn: TrainFn | None = None, console: Console | None = None) -> SweepResult:
    """Run (or resume, or join) the sweep described by ``cfg``; returns the table of the whole study.

    ``train_fn(Config) -> RunResult`` runs one trial (default ``cxrlab.training.train.train``); tests inject fakes.
    Safe to run the same command in several processes or on several machines sharing ``--storage``: each
    grid point runs once. Ctrl-C marks the running trial interrupted, writes the summary and re-raises.
    """
    if console is None and cfg.verbose:
        from rich.console import Console

        console = Console(stderr=True)
    spec = parse_sweep_spec(cfg.sweep_file)
    check_param_keys([p.key for p in spec.params])
    name = cfg.name or spec.name or cfg.sweep_file.stem
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise SweepError(f"sweep name '{name}' must be a plain directory name (no slashes); set --name")
    sweep_dir = cfg.out / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runner = TrialRunner(cfg, spec, name, sweep_dir, train_fn or _default_train())
    if console and spec.ignored:
        console.print(f"[dim]sweep file keys not used by the {cfg.backend} backend: {', '.join(spec.ignored)}[/]")
    params = [p.key for p in spec.searched]
    if console and spec.early_terminate and cfg.backend == "optuna" and not runner.accepts("callbacks"):
        console.print("[yellow]warning:[/] early_terminate is ignored: this train function takes no callbacks")

    if cfg.backend == "wandb":
        rows, ran = _run_wandb(cfg, spec, name, sweep_dir, runner, console)
        csv_path, plot = write_outputs(rows, spec, name, sweep_dir, costly=runner.base_cfg.costly_class)
        return SweepResult(
            name,
            sweep_dir,
            "wandb",
            "wandb",
            spec.method,
            spec.metric,
            spec.goal,
            params,
            spec.constants,
            rows,
            best_row(rows, spec.goal),
            failed_rows(rows, spec.method),
            ran,
            0,
            0,
            csv_path,
            plot,
            spec.ignored,
            costly_class=runner.base_cfg.costly_class,
        )

    opt = OptunaSweep(cfg, spec, name, sweep_dir, runner, console)
    if spec.method != "grid":
        opt._sweep_size()  # fail before any trial when the size is unknown
    try:
        opt.run()
    finally:  # also on Ctrl-C: the summary shows what finished
        rows = trial_rows(opt.study)
        importance = param_importances(opt.study, opt.seed)
        csv_path, plot = write_outputs(rows, spec, name, sweep_dir, importance, runner.base_cfg.costly_class)
    pending, running = opt.counts()
    freed = apply_retention(rows, best_row(rows, spec.goal), runner) if cfg.keep == "best" else 0
    from cxrlab.training.rundir import disk_usage

    return SweepResult(
        name=name,
        sweep_dir=sweep_dir,
        storage=redact_url(opt.url),
        backend="optuna",
        method=spec.method,
        metric=spec.metric,
        goal=spec.goal,
        params=params,
        constants=spec.constants,
        rows=rows,
        best=best_row(rows, spec.goal),
        failed=failed_rows(rows, spec.method),
        ran_here=opt.ran_here,
        pending=pending,
        running_elsewhere=running,
        summary_csv=csv_path,
        plot_html=plot,
        ignored_keys=spec.ignored,
        disk_bytes=disk_usage(sweep_dir),
        freed_bytes=freed,
        importances=importance[0],
        importance_note=importance[1],
        costly_class=runner.base_cfg.costly_class,
    )
