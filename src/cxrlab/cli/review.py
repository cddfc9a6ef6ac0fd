"""CLI command ``cxrlab review RUN``: the radiologist review web app, its export and import (``cxrlab.review``)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console

from cxrlab.cli.options import from_field
from cxrlab.review.config import ExportConfig, ReviewConfig, ReviewSettings

console = Console()
err_console = Console(stderr=True)


def _pct(v: object) -> str:
    return "–" if not isinstance(v, int | float) or not math.isfinite(float(v)) else f"{100 * float(v):.0f}%"


def review_cmd(
    run: Path = typer.Argument(
        ..., help="Run directory (runs/<id>) that `cxrlab explain RUN --split SPLIT` was run on.", show_default=False
    ),
    split: str = from_field(ReviewConfig, "split", "--split"),
    explain_dir: Path | None = from_field(ReviewConfig, "explain_dir", "--explain-dir"),
    db: str | None = from_field(ReviewConfig, "db", "--db", envvar="CXRLAB_REVIEW_DB"),
    sample: int = from_field(ReviewConfig, "sample", "--sample"),
    seed: int = from_field(ReviewConfig, "seed", "--seed"),
    reader: str | None = typer.Option(
        None, "--reader", help="Reader name the page starts with (default: your login name).", show_default=False
    ),
    host: str = from_field(ReviewSettings, "host", "--host"),
    port: int = from_field(ReviewSettings, "port", "--port"),
    token: str | None = from_field(
        ReviewSettings,
        "token",
        "--token",
        envvar="CXRLAB_TOKEN",
        note="Prefer the CXRLAB_TOKEN environment variable or --token-file: a command-line token is visible in `ps`.",
    ),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="Read the bearer token from this file's first line.", show_default=False
    ),
    export: bool = typer.Option(
        False,
        "--export",
        help="Do not serve: write answers.csv, agreement.json and (when readers corrected labels) a relabelled "
        "manifest.csv for `cxrlab data split` to --out (default <run>/review).",
    ),
    out: Path | None = from_field(ExportConfig, "out", "--out"),
    no_cam_overlap: bool = typer.Option(
        False, "--no-cam-overlap", help="Export: skip recomputing Grad-CAM inside the drawn regions."
    ),
    import_csv: Path | None = typer.Option(
        None,
        "--import",
        help="Do not serve: load an answers.csv (from --export) into the database, e.g. a colleague's answers.",
        show_default=False,
    ),
) -> None:
    """Radiologist review of a run's Grad-CAM explanations in the browser: errors first, then a stratified sample.
    For each image the reader answers: is the label right (A / X, 1-9 picks the right class)? does the highlighted
    region contain the decisive finding (Y / P / N)? Optionally drag a box over the decisive region and write a
    note; Enter saves and moves on. Answers go to a database (one per reader and image; resumable).

    Start with `cxrlab explain RUN --split test`, then `cxrlab review RUN` and open the printed address.
    `cxrlab review RUN --export` writes the answers CSV and the localisation agreement (share of "yes" with a 95%
    CI; Grad-CAM mass inside drawn regions)."""
    import getpass

    from cxrlab.config import ConfigError, build_config
    from cxrlab.review.core import export_review, import_answers, load_queue

    if export and import_csv is not None:
        raise ConfigError("--export and --import are separate steps: give one of them")
    base = {"run": run, "split": split, "explain_dir": explain_dir, "db": db, "sample": sample, "seed": seed}
    if import_csv is not None:
        cfg = build_config(ReviewConfig, base, source="cxrlab review options")
        q = load_queue(cfg)
        r = import_answers(import_csv, q.db_url)
        console.print(f"imported {r.n_rows} answers from {import_csv} into {r.db}")
        return
    if export:
        ecfg = build_config(
            ExportConfig, {**base, "out": out, "cam_overlap": not no_cam_overlap}, source="cxrlab review options"
        )
        res = export_review(ecfg)
        for run_id, a in res.agreement.items():
            lo, hi = a["share_yes_ci"]
            console.print(
                f"[bold]{run_id}[/]: {a['answers']} answers on {a['images']} images by {len(a['readers'])} reader(s); "
                f"region holds the finding: yes {_pct(a['share_yes'])} (95% CI {_pct(lo)}-{_pct(hi)}), "
                f"yes or partly {_pct(a['share_yes_or_partly'])}; label wrong {a['label_wrong']}/{a['label_answers']}"
            )
            if "cam_in_region" in a:
                c = a["cam_in_region"]
                console.print(f"  Grad-CAM mass inside the drawn regions: mean {_pct(c['mean'])} over {c['n']} answers")
        console.print(f"answers:   {res.answers_csv}")
        console.print(f"agreement: {res.agreement_json}")
        if res.relabel_manifest is not None:
            console.print(
                f"relabel:   {res.n_relabelled} label(s) changed -> {res.relabel_manifest} "
                f"(changes: {res.relabel_csv}); next: cxrlab data split {res.relabel_manifest.parent} --out DIR"
            )
        if res.relabel_conflicts:
            err_console.print(
                f"[yellow]{len(res.relabel_conflicts)} image(s) not relabelled: the readers disagree[/] "
                f"(e.g. {res.relabel_conflicts[0]})"
            )
        return

    import uvicorn

    from cxrlab.cli.serve import TOKEN_ENV, is_loopback, read_token_file
    from cxrlab.review.app import create_review_app
    from cxrlab.review.store import ReviewStore, redact

    if token_file is not None:
        if token is not None:
            raise ConfigError(f"give the token once: --token-file or --token/{TOKEN_ENV}, not both")
        token = read_token_file(token_file)
    try:
        default_reader = reader if reader is not None else getpass.getuser()
    except Exception:
        default_reader = ""
    settings = build_config(
        ReviewSettings,
        {"host": host, "port": port, "token": token, "reader": default_reader},
        source="cxrlab review options",
    )
    cfg = build_config(ReviewConfig, base, source="cxrlab review options")
    q = load_queue(cfg)
    if not q.items:
        console.print(f"[yellow]nothing to review[/]: {q.explain_dir} lists no images")
        return
    if not is_loopback(host) and token is None:
        err_console.print(f"[yellow]warning:[/] serving on {host} without --token: anyone who can reach it can answer")
    store = ReviewStore(q.db_url)
    app = create_review_app(q, store, settings)
    console.print(
        f"[bold]review[/]: run {q.run_id}, {len(q.items)} images ({q.n_errors} errors first, then "
        f"{len(q.items) - q.n_errors} sampled) on http://{host}:{port}/"
    )
    console.print(f"answers:  {redact(q.db_url)}")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        store.close()


def register(app: typer.Typer) -> None:
    """Add ``review`` to the root app (idempotent)."""
    if any(c.callback is review_cmd for c in app.registered_commands):
        return
    app.command(
        "review",
        short_help="Radiologist review of a run's Grad-CAM explanations in the browser "
        "(errors first, then a stratified sample); --export writes answers and agreement.",
    )(review_cmd)
