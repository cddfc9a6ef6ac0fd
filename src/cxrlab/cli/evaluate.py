"""CLI commands: ``cxrlab evaluate | compare | report | run``.

Thin: parse options, build the stage's typed config, call the stage function, print a rich summary. Stage
modules are imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cxrlab.analysis.configs import CompareConfig, EvalConfig
from cxrlab.cli.options import from_field
from cxrlab.config import build_config
from cxrlab.pipeline import RunConfig
from cxrlab.runs import EVAL_METRICS_FILE, SUMMARY_FILE

console = Console()
err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app (idempotent: main() may be called more than once)."""
    have = {c.callback for c in app.registered_commands}
    for name, fn in (("evaluate", evaluate_cmd), ("compare", compare_cmd), ("report", report_cmd), ("run", run_cmd)):
        if fn not in have:
            app.command(name)(fn)


def _ci(ci: tuple[float, float] | None, digits: int = 3) -> str:
    if not ci or not all(math.isfinite(v) for v in ci):
        return ""
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _f(x: float | None, digits: int = 4) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def print_eval(res) -> None:  # noqa: ANN001 - EvalResult, imported lazily
    p = res.prefix
    console.print(f"[bold]evaluate[/]: {res.n} images from {res.data_source} (dataset {res.dataset_version})")
    if res.absent_classes:
        console.print(
            f"[yellow]classes absent from this data:[/] {', '.join(res.absent_classes)} — their per-class metrics "
            f"are undefined; macro averages are over {', '.join(res.present_classes)}"
        )
    t = Table(title="summary", title_justify="left")
    t.add_column("metric", style="bold")
    t.add_column("value", justify="right")
    t.add_column("95% CI")
    for name in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_macro", "ece", "nll"):
        key = f"{p}/{name}"
        t.add_row(key, _f(res.metrics.get(key)), _ci(res.ci.get(key)))
    key = f"{p}/recall_{res.costly_class}"
    if res.costly_class and key in res.metrics:  # the headline: recall of the class whose misses cost most
        t.add_row(f"{key} (costly class)", _f(res.metrics[key]), _ci(res.ci.get(key)))
    console.print(t)
    pc = Table(title="per class (recall = the seed's per-class accuracy; 95% CI)", title_justify="left")
    for col in ("class", "n", "precision", "recall [95% CI]", "F1", "AUC", "FN", "FP"):
        pc.add_column(col, justify="left" if col == "class" else "right")
    for r in res.per_class.itertuples(index=False):
        if not r.present:
            pc.add_row(r[0], "0", "absent", "absent", "absent", "–", "–", str(r.fp))
            continue
        rec = f"{r.recall:.3f} {_ci((r.recall_lo, r.recall_hi), 2)}"
        pc.add_row(r[0], str(r.support), _f(r.precision, 3), rec, _f(r.f1, 3), _f(r.auc, 3), str(r.fn), str(r.fp))
    console.print(pc)
    cm = Table(title="confusion matrix (rows = true, columns = predicted)", title_justify="left")
    cm.add_column("")
    for c in res.classes:
        cm.add_column(c, justify="right")
    for c, row in zip(res.classes, res.confusion, strict=True):
        cm.add_row(c, *[str(int(v)) for v in row])
    console.print(cm)
    if res.per_source is not None:
        console.print(per_source_table(res.per_source, res.classes))
    print_shift_warnings(res.warnings, res.shift)
    for s in res.skipped[:10]:
        err_console.print(f"[yellow]skipped[/] {s['path']}: {s['reason']}")
    if len(res.skipped) > 10:
        err_console.print(f"[yellow]... and {len(res.skipped) - 10} more skipped files (see skipped.csv)[/]")
    if res.wandb_logged:
        console.print("logged to the run's W&B run")
    console.print(f"results: {res.out_dir}  report: {res.paths.get('report', '-')}")


def per_source_table(ps, classes: list[str]) -> Table:  # noqa: ANN001 - DataFrame from per_source_metrics
    """n, accuracy [CI] and per-class recall [CI] (n) per source."""
    t = Table(title="per source (recall [95% CI], n; predicted = images predicted as the class)", title_justify="left")
    t.add_column("source", style="bold")
    t.add_column("n", justify="right")
    t.add_column("accuracy [95% CI]", justify="right")
    shown = [c for c in classes if (ps[f"n_{c}"] > 0).any()]
    for c in shown:
        t.add_column(f"recall {c}", justify="right")
    t.add_column("predicted", justify="left")
    for r in ps.to_dict(orient="records"):
        cells = [r["source"], str(r["n"]), f"{_f(r['accuracy'], 3)} {_ci((r['accuracy_lo'], r['accuracy_hi']), 2)}"]
        for c in shown:
            if r[f"n_{c}"] == 0:
                cells.append("–")
            else:
                cells.append(
                    f"{_f(r[f'recall_{c}'], 2)} {_ci((r[f'recall_{c}_lo'], r[f'recall_{c}_hi']), 2)} ({r[f'n_{c}']})"
                )
        cells.append(", ".join(f"{c} {r[f'predicted_{c}']}" for c in classes if r[f"predicted_{c}"]))
        t.add_row(*cells)
    return t


def print_shift_warnings(warnings: list[str], shift: dict) -> None:
    """The shift checks that fired (red, on stderr), else one line saying they passed."""
    for w in warnings:
        err_console.print(f"[bold red]warning:[/] {w}")
    if not warnings and shift:
        parts = []
        if "label_shift" in shift:
            parts.append(f"label shift p={shift['label_shift']['p_value']:.2g}")
        if "collapse" in shift:
            parts.append(f"collapse p={shift['collapse']['p_value']:.2g}")
        if "ood" in shift:
            o = shift["ood"]
            parts.append(f"{o['n_flagged']} of {o['n']} images flagged out-of-distribution")
        console.print("shift checks passed: " + "; ".join(parts))
    if shift.get("note"):
        console.print(f"[yellow]note:[/] {shift['note']}")


def evaluate_cmd(
    target: Path = typer.Argument(..., help="Run directory (runs/<id>) or model bundle directory.", show_default=False),
    split: str = from_field(EvalConfig, "split", "--split"),
    data: Path | None = from_field(EvalConfig, "data", "--data"),
    out: Path | None = from_field(EvalConfig, "out", "--out", "-o"),
    batch_size: int = from_field(EvalConfig, "batch_size", "--batch-size"),
    n_boot: int = from_field(EvalConfig, "n_boot", "--n-boot"),
    seed: int = from_field(EvalConfig, "seed", "--seed"),
    device: str = from_field(EvalConfig, "device", "--device"),
    wandb: str = from_field(EvalConfig, "wandb", "--wandb"),
    costly_class: str | None = from_field(EvalConfig, "costly_class", "--costly-class"),
    progress: bool = from_field(EvalConfig, "progress", "--progress/--no-progress"),
) -> None:
    """Metrics with 95% bootstrap CIs, per-class table, confusion matrix, calibration (ECE + reliability
    diagram), ROC AUC, predictions.csv and a self-contained report.html."""
    from cxrlab.analysis.evaluate import evaluate

    cfg = build_config(
        EvalConfig,
        {
            "target": target,
            "split": split,
            "data": data,
            "out": out,
            "batch_size": batch_size,
            "n_boot": n_boot,
            "seed": seed,
            "device": device,
            "wandb": wandb,
            "costly_class": costly_class,
            "progress": progress,
        },
        source="cxrlab evaluate",
    )
    print_eval(evaluate(cfg))


def compare_cmd(
    baseline: Path = typer.Argument(..., help="Baseline run or bundle directory.", show_default=False),
    challenger: Path = typer.Argument(..., help="Challenger run or bundle directory.", show_default=False),
    split: str = from_field(CompareConfig, "split", "--split"),
    data: Path | None = from_field(CompareConfig, "data", "--data"),
    out: Path | None = from_field(CompareConfig, "out", "--out", "-o"),
    batch_size: int = from_field(CompareConfig, "batch_size", "--batch-size"),
    n_boot: int = from_field(CompareConfig, "n_boot", "--n-boot"),
    seed: int = from_field(CompareConfig, "seed", "--seed"),
    alpha: float = from_field(CompareConfig, "alpha", "--alpha"),
    device: str = from_field(CompareConfig, "device", "--device"),
    costly_class: str | None = from_field(CompareConfig, "costly_class", "--costly-class"),
    progress: bool = from_field(CompareConfig, "progress", "--progress/--no-progress"),
) -> None:
    """Both models on the same images: metrics side by side, McNemar's exact test, a paired bootstrap CI of the
    accuracy difference, false negatives/positives per class, and a plain verdict (compare.html/.json)."""
    from cxrlab.analysis.compare import compare

    cfg = build_config(
        CompareConfig,
        {
            "baseline": baseline,
            "challenger": challenger,
            "split": split,
            "data": data,
            "out": out,
            "batch_size": batch_size,
            "n_boot": n_boot,
            "seed": seed,
            "alpha": alpha,
            "device": device,
            "costly_class": costly_class,
            "progress": progress,
        },
        source="cxrlab compare",
    )
    r = compare(cfg)
    p = r.baseline.prefix
    t = Table(title=f"baseline vs challenger on {r.n} images", title_justify="left")
    for col in ("metric", "baseline", "95% CI", "challenger", "95% CI ", "Δ"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    names = ["accuracy", "f1_macro", "precision_macro", "recall_macro", "auc_macro", "ece"]
    names += [f"recall_{c}" for c in r.errors["class"]]  # the costly class first
    for n in names:
        k = f"{p}/{n}"
        vb, vc = r.baseline.metrics.get(k, math.nan), r.challenger.metrics.get(k, math.nan)
        t.add_row(n, _f(vb), _ci(r.baseline.ci.get(k)), _f(vc), _ci(r.challenger.ci.get(k)), f"{vc - vb:+.4f}")
    console.print(t)
    e = Table(title="errors per class (false negatives of the costly class first)", title_justify="left")
    for col in r.errors.columns:
        e.add_column(col.replace("_", " "), justify="left" if col == "class" else "right")
    for row in r.errors.itertuples(index=False):
        e.add_row(*[str(v) for v in row])
    console.print(e)
    if r.baseline.per_source is not None and r.challenger.per_source is not None:
        ps = Table(title="accuracy per source [95% CI]", title_justify="left")
        for col in ("source", "n", "baseline", "challenger"):
            ps.add_column(col, justify="left" if col == "source" else "right")
        chal = r.challenger.per_source.set_index("source")
        for row in r.baseline.per_source.to_dict(orient="records"):
            c = chal.loc[row["source"]] if row["source"] in chal.index else None
            cells = [f"{_f(row['accuracy'], 3)} {_ci((row['accuracy_lo'], row['accuracy_hi']), 2)}"]
            cells.append(
                f"{_f(c['accuracy'], 3)} {_ci((c['accuracy_lo'], c['accuracy_hi']), 2)}" if c is not None else "–"
            )
            ps.add_row(str(row["source"]), str(row["n"]), *cells)
        console.print(ps)
    for name, side in (("baseline", r.baseline), ("challenger", r.challenger)):
        for w in side.warnings:
            err_console.print(f"[bold red]warning ({name}):[/] {w}")
    mc = r.mcnemar
    console.print(
        f"McNemar: only baseline right b={mc.b}, only challenger right c={mc.c}; exact p={mc.p_exact:.4g}, "
        f"mid-p={mc.p_midp:.4g}"
    )
    style = "green" if r.significant else "yellow"
    console.print(f"[bold {style}]verdict:[/] {r.verdict}")
    console.print(f"results: {r.out_dir}  report: {r.paths.get('report', '-')}")


def report_cmd(
    run: Path = typer.Argument(..., help="Run directory (or an eval-* folder).", show_default=False),
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML file to write [default: RUN/report.html]."),
    audit: Path | None = typer.Option(None, "--audit", help="Audit folder to summarise [default: the pipeline's]."),
) -> None:
    """(Re)build the self-contained HTML report of a run from its files (training curves, evaluations,
    calibration, audit summary, link to the explanations)."""
    from cxrlab.report.pages import write_eval_report, write_run_report

    if (run / EVAL_METRICS_FILE).is_file() and not (run / SUMMARY_FILE).is_file():
        path = write_eval_report(run, out)
    else:
        path = write_run_report(run, out, audit_dir=audit)
    console.print(f"report: {path}")


def split_src_and_overrides(args: list[str]) -> tuple[Path | None, list[str]]:
    """``run``'s positional words -> (SRC or None, extra ``key=value`` overrides).

    Several overrides may follow one ``--set`` (as in ``train`` and ``sweep``): a word with ``=`` that is not an
    existing path is an override. More than one remaining word is a ``ConfigError``.
    """
    from cxrlab.config import ConfigError

    sets = [a for a in args if "=" in a and not Path(a).exists()]
    rest = [a for a in args if a not in sets]
    if len(rest) > 1:
        raise ConfigError(
            f"cxrlab run takes one SRC, got {rest}; overrides look like key=value (e.g. --set epochs=3 seed=1)"
        )
    return (Path(rest[0]) if rest else None), sets


def run_cmd(
    args: list[str] | None = typer.Argument(
        None,
        help="SRC, the raw data: folder of class folders, Kaggle train/test folder or CSV. key=value words after "
        "--set are more overrides (--set a=1 b=2).",
        show_default=False,
        metavar="[SRC]",
    ),
    out: Path = from_field(RunConfig, "out", "--out", "-o"),
    demo: bool = from_field(RunConfig, "demo", "--demo"),
    config: Path | None = from_field(RunConfig, "config", "--config", "-c"),
    set_: list[str] = from_field(RunConfig, "overrides", "--set", note="Repeatable."),
    force: list[str] = from_field(RunConfig, "force", "--force", note="Repeatable."),
    per_class: int | None = from_field(RunConfig, "per_class", "--per-class"),
    patient_regex: str | None = from_field(RunConfig, "patient_regex", "--patient-regex"),
    skip_explain: bool = typer.Option(False, "--skip-explain", help="Do not run the explanation stage."),
    skip_audit: bool = typer.Option(False, "--skip-audit", help="Do not run the data audit."),
    demo_n: int = from_field(RunConfig, "demo_n_per_class", "--demo-n"),
    demo_size: int = from_field(RunConfig, "demo_size", "--demo-size"),
    demo_epochs: int = from_field(RunConfig, "demo_epochs", "--demo-epochs"),
    demo_seed: int = from_field(RunConfig, "demo_seed", "--demo-seed"),
    n_boot: int = from_field(RunConfig, "n_boot", "--n-boot"),
    progress: bool = from_field(RunConfig, "progress", "--progress/--no-progress"),
) -> None:
    """The main job: ingest -> split -> audit -> train -> evaluate (-> explain) -> report, resumable stage by
    stage (a finished stage is not redone)."""
    from cxrlab.pipeline import run_pipeline

    src, more_sets = split_src_and_overrides(args or [])
    set_ = [*set_, *more_sets]
    cfg = build_config(
        RunConfig,
        {
            "src": src,
            "out": out,
            "demo": demo,
            "config": config,
            "overrides": list(set_),
            "force": list(force),
            "per_class": per_class,
            "patient_regex": patient_regex,
            "explain": not skip_explain,
            "audit": not skip_audit,
            "demo_n_per_class": demo_n,
            "demo_size": demo_size,
            "demo_epochs": demo_epochs,
            "demo_seed": demo_seed,
            "n_boot": n_boot,
            "progress": progress,
        },
        source="cxrlab run",
    )
    res = run_pipeline(cfg, log=console.print)
    t = Table(title="stages", title_justify="left")
    t.add_column("stage", style="bold")
    t.add_column("status")
    t.add_column("seconds", justify="right")
    t.add_column("output")
    for s in res.stages:
        t.add_row(s.name, s.status, f"{s.seconds:.1f}", str(s.output or ""))
    console.print(t)
    for k, v in res.headline.items():
        console.print(f"  {k} = {v:.4f}")
    console.print(f"[bold green]report:[/] {res.report}")
