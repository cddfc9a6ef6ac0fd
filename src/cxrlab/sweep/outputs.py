"""What a sweep leaves behind: the per-trial table, ``summary.csv``, ``parallel_coordinates.html``, ``best.json``,
the console table and checkpoint retention."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrlab.atomic import write_json
from cxrlab.data.classes import COSTLY_CLASS, costly_recall_key
from cxrlab.runs import BEST_CKPT, CKPT_DIR
from cxrlab.sweep.optuna_backend import (
    A_FAILURE,
    A_HOST,
    A_METRICS,
    A_PARAMS,
    A_PID,
    A_POINT,
    A_REASON,
    A_RUN_DIR,
    A_YIELD,
)
from cxrlab.sweep.resume import A_RESUMES, resumed_by
from cxrlab.sweep.spec import SweepSpec
from cxrlab.sweep.trial import SweepResult, TrialRunner

if TYPE_CHECKING:
    import optuna
    from rich.table import Table


# ------------------------------------------------------------------------------------- summary/plot

_USER = "user_attrs_"


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial of the whole study (every worker), read from Optuna's ``study.trials_dataframe()``:
    its state becomes the status (a FAIL is FAILED for an error, INTERRUPTED for a lost worker), its user
    attributes the parameters, metrics, reason, worker and run directory, its duration the trial's time."""
    df = study.trials_dataframe(attrs=("number", "state", "value", "duration", "user_attrs"), multi_index=False)
    if df.empty:
        return []
    df = df.sort_values("number").astype(object)
    records = df.where(df.notna(), None).to_dict("records")  # a trial without that attribute: None
    trials = [
        (int(rec["number"]), {k[len(_USER) :]: v for k, v in rec.items() if k.startswith(_USER)}) for rec in records
    ]
    for _, u in trials:  # a column of integers with gaps comes back as floats
        u.update({k: int(u[k]) for k in (A_PID, A_RESUMES) if isinstance(u.get(k), float)})
    successor = resumed_by(trials)
    rows: list[dict[str, Any]] = []
    for rec, (number, u) in zip(records, trials, strict=True):
        state = rec["state"]
        if u.get(A_YIELD):
            continue
        if state == "COMPLETE":
            status, reason = "COMPLETE", ""
        elif state == "RUNNING":
            status, reason = "RUNNING", f"on {u.get(A_HOST) or '?'} pid {u.get(A_PID) or '?'}"
        elif state == "FAIL" and u.get(A_FAILURE) == "error":
            status, reason = "FAILED", u.get(A_REASON) or ""
        elif state == "FAIL":
            status = "INTERRUPTED"
            reason = u.get(A_REASON) or "worker lost (no heartbeat within the grace period)"
            if number in successor:
                reason += f"; resumed by trial {successor[number]}"
        elif state == "PRUNED":
            status, reason = "PRUNED", u.get(A_REASON) or "pruned"
        else:
            status, reason = state, u.get(A_REASON) or ""
        if u.get(A_RESUMES) is not None:
            reason = f"resumed trial {u[A_RESUMES]} from its last.ckpt" + (f"; {reason}" if reason else "")
        rows.append(
            {
                "trial": number,
                "status": status,
                "params": dict(u.get(A_PARAMS) or {}),
                "objective": rec["value"] if state == "COMPLETE" else None,
                "metrics": dict(u.get(A_METRICS) or {}),
                "reason": reason,
                "run_dir": u.get(A_RUN_DIR) or "",
                "worker": f"{u.get(A_HOST) or ''}:{u.get(A_PID) or ''}",
                "duration_s": round(rec["duration"].total_seconds(), 2) if rec["duration"] is not None else None,
                "point": u.get(A_POINT) or "",
                "resumed_by": successor.get(number),
            }
        )
    return rows


def best_row(rows: list[dict[str, Any]], goal: str) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] == "COMPLETE" and r["objective"] is not None]
    if not done:
        return None
    sign = -1.0 if goal == "maximize" else 1.0
    return min(done, key=lambda r: (sign * r["objective"], r["trial"]))


def failed_rows(rows: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """Failed trials whose point never completed later (a point retried successfully is not a failure)."""
    completed = {r["point"] for r in rows if r["status"] == "COMPLETE" and r["point"]}
    return [r for r in rows if r["status"] == "FAILED" and not (method == "grid" and r["point"] in completed)]


def _metric_columns(rows: list[dict[str, Any]], metric: str) -> list[str]:
    names = {k for r in rows for k in r["metrics"]}
    val = sorted(k for k in names if k.startswith("val/") and k != metric)
    test = sorted(k for k in names if k.startswith("test/") and k != metric)
    other = sorted(names - set(val) - set(test) - {metric})
    return [metric, *val, *test, *other]


def write_summary_csv(rows: list[dict[str, Any]], params: list[str], metric: str, path: Path) -> Path:
    """One row per trial: trial, status, parameters, objective + every val/test metric, reason, run dir."""
    mcols = _metric_columns(rows, metric)
    header = ["trial", "status", *params, *mcols, "reason", "duration_s", "worker", "run_dir"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several workers may write it: replace atomically
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            vals = {**r["metrics"]}
            if r["objective"] is not None:
                vals[metric] = r["objective"]
            w.writerow(
                [
                    r["trial"],
                    r["status"],
                    *[_cell(r["params"].get(p, "")) for p in params],
                    *[_cell(vals.get(m, "")) for m in mcols],
                    r["reason"],
                    r["duration_s"] if r["duration_s"] is not None else "",
                    r["worker"],
                    r["run_dir"],
                ]
            )
    tmp.replace(path)
    return path


def _cell(v: Any) -> Any:
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.6g}")  # float32 metrics: 0.3333333432674408 -> 0.333333
    return json.dumps(v) if isinstance(v, list | dict) else v


def write_parcoords(
    rows: list[dict[str, Any]],
    params: list[str],
    spec: SweepSpec,
    path: Path,
    title: str,
    importance: tuple[dict[str, float] | None, str] | None = None,
    costly: str = COSTLY_CLASS,
) -> Path:
    """Self-contained interactive parallel-coordinates HTML (plotly, JS inlined) of the completed (and pruned)
    trials; with ``importance`` (``(importances or None, note)``), the parameter importances beside it.

    Categorical parameters become integer axes with their values as tick labels, like W&B's view. Not Optuna's
    ``plot_parallel_coordinate``: it draws COMPLETE trials only (no pruned ones, no status axis), puts the
    objective first and the parameters in alphabetical order, and knows nothing of the W&B spec's value order or
    the test metrics; its figure would need plotly.js inlined all the same.
    """
    import plotly.graph_objects as go

    done = [r for r in rows if r["status"] == "COMPLETE" and r["objective"] is not None]
    # pruned trials are drawn too, with the last value they reported, and a status axis tells them apart
    pruned = [r for r in rows if r["status"] == "PRUNED" and r["metrics"].get(spec.metric) is not None]
    pruned = [{**r, "objective": r["metrics"][spec.metric]} for r in pruned]
    done = sorted(done + pruned, key=lambda r: r["trial"])
    dims: list[dict[str, Any]] = []
    declared = {p.key: p for p in spec.params}
    for key in params:
        vals = [r["params"].get(key) for r in done]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals) and vals
        if numeric:
            dims.append({"label": key, "values": vals})
        else:
            order = [_cell(v) for v in declared[key].values] if key in declared and declared[key].values else []
            for v in vals:
                if _cell(v) not in order:
                    order.append(_cell(v))
            idx = {str(v): i for i, v in enumerate(order)}
            dims.append(
                {
                    "label": key,
                    "values": [idx[str(_cell(v))] for v in vals],
                    "tickvals": list(range(len(order))),
                    "ticktext": [str(v) for v in order],
                    "range": [-0.25, max(len(order) - 1, 0) + 0.25],
                }
            )
    objective = [r["objective"] for r in done]
    if pruned:
        status = [1 if r["status"] == "PRUNED" else 0 for r in done]
        dims.append({"label": "status", "values": status, "tickvals": [0, 1], "ticktext": ["COMPLETE", "PRUNED"]})
    dims.append({"label": spec.metric, "values": objective})
    names = {k for r in done for k in r["metrics"]}
    for extra in ("test/f1_macro", costly_recall_key(names, costly=costly)):
        if extra and extra in names and extra != spec.metric:
            dims.append({"label": extra, "values": [r["metrics"].get(extra, float("nan")) for r in done]})
    fig = go.Figure(
        go.Parcoords(
            line={
                "color": objective or [0],
                "colorscale": "Viridis",
                "showscale": True,
                "colorbar": {"title": {"text": spec.metric}},
            },
            dimensions=dims,
            customdata=[r["trial"] for r in done],
        )
    )
    failed = sum(r["status"] == "FAILED" for r in rows)
    sub = f"{len(done) - len(pruned)} completed trial(s)" + (f", {failed} failed (not plotted)" if failed else "")
    sub += f", {len(pruned)} pruned (their last reported {spec.metric})" if pruned else ""
    fig.update_layout(
        title={"text": f"{title}<br><sup>{sub}</sup>", "y": 0.97}, margin={"l": 110, "r": 80, "t": 130, "b": 40}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    from cxrlab.sweep.importance import page

    tmp.write_text(page(fig, *(importance or (None, None)), title), encoding="utf-8")  # None: no importance panel
    tmp.replace(path)
    return path


def summary_table(result: SweepResult, max_reason: int = 60) -> Table:
    """The rich table the CLI prints: parameters -> objective, key val/test metrics, status."""
    from rich.table import Table

    names = {k for r in result.rows for k in r["metrics"]}
    costly = costly_recall_key(names, costly=result.costly_class)
    extra = [
        k
        for k in ("val/f1_macro", "val/accuracy", "test/accuracy", "test/f1_macro", costly)
        if k and k in names and k != result.metric
    ]
    t = Table(title=f"sweep {result.name}: {result.method}, {result.goal} {result.metric}", title_justify="left")
    t.add_column("trial", justify="right")
    for p in result.params:
        t.add_column(p)
    t.add_column(result.metric, justify="right", style="bold")
    for k in extra:
        t.add_column(k, justify="right")
    t.add_column("status")
    show_reason = any(r["reason"] for r in result.rows)
    if show_reason:
        t.add_column("reason", overflow="fold")
    best = result.best["trial"] if result.best else None
    colour = {"COMPLETE": "green", "FAILED": "red", "RUNNING": "cyan", "INTERRUPTED": "yellow", "PRUNED": "magenta"}
    for r in result.rows:
        fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        reason = r["reason"] if len(r["reason"]) <= max_reason else r["reason"][: max_reason - 3] + "..."
        t.add_row(
            f"{r['trial']}{' *' if r['trial'] == best else ''}",
            *[str(_cell(r["params"].get(p, ""))) for p in result.params],
            fmt(r["objective"] if r["objective"] is not None else r["metrics"].get(result.metric)),
            *[fmt(r["metrics"].get(k)) for k in extra],
            f"[{colour.get(r['status'], 'white')}]{r['status']}[/]",
            *([reason] if show_reason else []),
        )
    return t


def apply_retention(rows: list[dict[str, Any]], best: dict[str, Any] | None, runner: TrialRunner) -> int:
    """``keep=best``: the best trial keeps bundle/ + last.ckpt, other finished trials keep bundle/ only, interrupted
    trials' leftover directories go. Only finished trials are touched (never one running elsewhere). Returns the
    bytes freed."""
    import shutil

    from cxrlab.training.rundir import disk_usage

    runs = runner.runs_dir.resolve()
    freed = 0

    def inside(p: Path) -> bool:
        try:
            return p.resolve().is_relative_to(runs) and p.resolve() != runs
        except OSError:
            return False

    def drop(p: Path) -> None:
        nonlocal freed
        if not p.exists() or not inside(p):
            return
        size = disk_usage(p) if p.is_dir() else p.stat().st_size
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        freed += size

    best_trial = best["trial"] if best else None
    for r in rows:
        if r["status"] == "COMPLETE" and r["run_dir"]:
            ckpts = Path(r["run_dir"]) / CKPT_DIR
            if r["trial"] == best_trial:
                drop(ckpts / BEST_CKPT)  # its weights are the bundle's; last.ckpt continues training
            else:
                drop(ckpts)
        elif r["status"] == "PRUNED" and r["run_dir"]:
            drop(Path(r["run_dir"]) / CKPT_DIR)
        elif r["status"] == "INTERRUPTED" and r.get("resumed_by") is None:  # a resumed one's dir is its successor's
            drop(runner.runs_dir / runner.run_name(r["trial"]))
    return freed


def write_outputs(
    rows: list[dict[str, Any]],
    spec: SweepSpec,
    name: str,
    sweep_dir: Path,
    importance: tuple[dict[str, float] | None, str] | None = None,
    costly: str = COSTLY_CLASS,
) -> tuple[Path, Path | None]:
    """summary.csv, parallel_coordinates.html (with the importances when given; also importance.json), best.json."""
    params = [p.key for p in spec.searched]
    csv_path = write_summary_csv(rows, params, spec.metric, sweep_dir / "summary.csv")
    plot = write_parcoords(
        rows, params, spec, sweep_dir / "parallel_coordinates.html", f"sweep {name}", importance, costly
    )
    if importance is not None:
        write_json(sweep_dir / "importance.json", {"importances": importance[0], "note": importance[1]})
    best = best_row(rows, spec.goal)
    write_json(sweep_dir / "best.json", best, default=str)
    return csv_path, plot
