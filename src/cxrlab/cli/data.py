"""CLI commands of the data stage: ``cxrlab data ingest | synth | split | audit``.

Each command is one function on ``data_app``: parse options, build the stage's typed config, call the stage
function, print a rich summary. Stage modules are imported inside the commands so ``--help`` stays fast.
To add a command, decorate a new function with ``@data_app.command("name")`` below the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from cxrlab.cli.options import comma_list, from_field
from cxrlab.config import build_config
from cxrlab.data.configs import AuditConfig, IngestConfig, SplitConfig, SynthConfig

data_app = typer.Typer(
    name="data",
    help="Data stage: ingest a folder/CSV of X-rays into a manifest, split it, audit it, or make phantoms.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add the ``data`` group to the root app (idempotent: main() may be called more than once)."""
    if any(g.typer_instance is data_app for g in app.registered_groups):
        return
    app.add_typer(data_app, name="data")


def _warn(lines: list[str]) -> None:
    for line in lines:
        err_console.print(f"[yellow]warning:[/] {line}")


def _kv_table(title: str | None, rows: list[tuple[str, Any]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in rows:
        t.add_row(k, str(v))
    return t


# --------------------------------------------------------------------------------------------------- ingest


@data_app.command("ingest")
def ingest_cmd(
    src: list[Path] = typer.Argument(
        ...,
        help="Folder with one sub-folder per class, a Kaggle folder (train/ + test/ with class folders), "
        "or a CSV of path,label[,patient_id][,source] (relative paths are resolved against the CSV's folder). "
        "Several roots go into one manifest.",
        show_default=False,
    ),
    out: Path = from_field(IngestConfig, "out", "--out", "-o"),
    patient_regex: str | None = from_field(IngestConfig, "patient_regex", "--patient-regex"),
    source_regex: str | None = from_field(IngestConfig, "source_regex", "--source-regex"),
    source_column: str = from_field(IngestConfig, "source_column", "--source-column"),
    source_name: list[str] = from_field(IngestConfig, "source_names", "--source-name", note="Repeatable."),
    csv: bool | None = from_field(IngestConfig, "csv", "--csv/--no-csv"),
    strict: bool = from_field(IngestConfig, "strict", "--strict"),
    workers: int = from_field(IngestConfig, "workers", "--workers"),
    progress: bool = from_field(IngestConfig, "progress", "--progress/--no-progress"),
) -> None:
    """Decode every image once and write a manifest (path, label, sha256, size, mode, bit depth, patient id,
    original split, perceptual hash, source) plus rejects.csv with a reason for every file that could not be read."""
    from cxrlab.data.ingest import IngestRejectsError, ingest

    cfg = build_config(
        IngestConfig,
        {
            "src": src[0],
            "extra_src": tuple(src[1:]),
            "out": out,
            "patient_regex": patient_regex,
            "source_regex": source_regex,
            "source_column": source_column,
            "source_names": tuple(source_name),
            "csv": csv,
            "strict": strict,
            "workers": workers,
            "progress": progress,
        },
        source="cxrlab data ingest",
    )
    try:
        res = ingest(cfg)
    except IngestRejectsError as e:  # --strict: show what was found, then fail
        _print_ingest(e.result)
        raise
    _print_ingest(res)
    _warn(res.warnings)


def _print_ingest(res: Any) -> None:
    n_roots = len(res.roots)
    console.print(
        f"[bold]ingest[/]: {res.layout} layout, {res.n_images} images from {res.n_candidates} candidates"
        + (f" in {n_roots} roots" if n_roots > 1 else "")
        + f", {len(res.counts_by_source)} source(s)"
    )
    t = Table()
    t.add_column("class", style="bold")
    splits = sorted(res.counts_by_split) if len(res.counts_by_split) > 1 or "" not in res.counts_by_split else []
    for s in splits:
        t.add_column(s, justify="right")
    t.add_column("images", justify="right")
    for label in res.classes:
        cells = [str(res.counts_by_split.get(s, {}).get(label, 0)) for s in splits]
        t.add_row(label, *cells, str(res.counts.get(label, 0)))
    t.add_section()
    totals = [str(sum(res.counts_by_split.get(s, {}).values())) for s in splits]
    t.add_row("total", *totals, str(res.n_images))
    console.print(t)
    if res.counts_by_source:
        console.print(source_table(res.counts_by_source, res.classes, "images per source"))
    rows: list[tuple[str, Any]] = [
        ("rejected", f"{res.n_rejected}" + (f"  (see {res.rejects_path})" if res.n_rejected else "")),
        ("duplicate groups (sha256)", f"{res.n_duplicate} ({res.n_duplicate_files} files)"),
        ("ignored non-image files", res.n_ignored),
        ("patients", res.n_patients),
        ("patient id from", ", ".join(f"{k}: {v}" for k, v in res.patient_id_sources.items() if v)),
        ("source from", ", ".join(f"{k}: {v}" for k, v in res.source_from.items() if v)),
        ("time", f"{res.elapsed_s:.1f} s ({res.n_candidates / max(res.elapsed_s, 1e-9):.0f} files/s)"),
        ("manifest", res.manifest_path),
        ("rejects", res.rejects_path),
        ("summary", res.summary_path),
    ]
    console.print(_kv_table(None, rows))
    if res.n_rejected:
        rt = Table(title="rejected files (first 10)", title_justify="left")
        rt.add_column("path")
        rt.add_column("reason")
        for r in res.rejects[:10]:
            rt.add_row(str(r["path"]), str(r["reason"]))
        console.print(rt)


def source_table(counts: dict[str, dict[str, int]], classes: list[str], title: str) -> Table:
    """source x class counts (with totals) as a rich table."""
    t = Table(title=title, title_justify="left")
    t.add_column("source", style="bold")
    for c in classes:
        t.add_column(c, justify="right")
    t.add_column("total", justify="right")
    for s, row in counts.items():
        t.add_row(s, *[str(row.get(c, 0)) for c in classes], str(sum(row.values())))
    return t


# ---------------------------------------------------------------------------------------------------- synth


@data_app.command("synth")
def synth_cmd(
    out: Path = from_field(SynthConfig, "out", "--out", "-o"),
    n_per_class: int = from_field(SynthConfig, "n_per_class", "--n-per-class", "-n"),
    size: int = from_field(SynthConfig, "size", "--size"),
    seed: int = from_field(SynthConfig, "seed", "--seed"),
    shortcut_class: str | None = from_field(SynthConfig, "shortcut_class", "--shortcut-class"),
    shortcut_prob: float = from_field(SynthConfig, "shortcut_prob", "--shortcut-prob"),
    marker_all: bool = from_field(SynthConfig, "marker_all", "--marker-all"),
) -> None:
    """Write synthetic chest radiograph phantoms (COVID19 / NORMAL / PNEUMONIA), one folder per class:
    the embedded default data set (nothing is downloaded)."""
    from cxrlab.data.manifest import DataError
    from cxrlab.data.synth import CLASSES, generate

    if shortcut_class is not None and shortcut_class not in CLASSES:
        raise DataError(f"--shortcut-class {shortcut_class!r} is not a phantom class; valid: {', '.join(CLASSES)}")
    res = generate(
        build_config(
            SynthConfig,
            {
                "out": out,
                "n_per_class": n_per_class,
                "size": size,
                "seed": seed,
                "shortcut_class": shortcut_class,
                "shortcut_prob": shortcut_prob,
                "marker_all": marker_all,
            },
            source="cxrlab data synth",
        )
    )
    console.print(f"[bold]synth[/]: {sum(res.counts.values())} phantoms of {size} px in {res.out}")
    t = Table()
    t.add_column("class", style="bold")
    t.add_column("images", justify="right")
    t.add_column("with marker", justify="right")
    for label, n in res.counts.items():
        t.add_row(label, str(n), str(res.marked.get(label, 0)))
    console.print(t)
    console.print(f"next: cxrlab data ingest {res.out} --out <DIR>")


# ---------------------------------------------------------------------------------------------------- split


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@data_app.command("split")
def split_cmd(
    manifest: Path = typer.Argument(
        ..., help="manifest.csv from `cxrlab data ingest`, or its folder.", show_default=False
    ),
    out: Path = from_field(SplitConfig, "out", "--out", "-o"),
    fractions: str = from_field(SplitConfig, "fractions", "--fractions", to_cli=comma_list),
    seed: int = from_field(SplitConfig, "seed", "--seed"),
    per_class: int | None = from_field(SplitConfig, "per_class", "--per-class"),
    exclude_flagged: str = from_field(
        SplitConfig, "exclude_flagged", "--exclude-flagged", to_cli=comma_list, note="Comma list; needs --audit."
    ),
    audit_dir: Path | None = from_field(SplitConfig, "audit", "--audit"),
    near_dup_threshold: int = from_field(SplitConfig, "near_dup_threshold", "--near-dup-threshold"),
    holdout_source: list[str] = from_field(SplitConfig, "holdout_sources", "--holdout-source", note="Repeatable."),
    name: str | None = from_field(SplitConfig, "name", "--name"),
    wandb: str = from_field(SplitConfig, "wandb", "--wandb"),
    wandb_project: str = from_field(SplitConfig, "wandb_project", "--wandb-project"),
    progress: bool = from_field(SplitConfig, "progress", "--progress/--no-progress"),
) -> None:
    """Grouped (patient, sha256, near-duplicate), stratified, seeded train/val/test split of a manifest, with a
    dataset version id derived from its content."""
    from cxrlab.config import ConfigError
    from cxrlab.data.split import split

    try:
        fr = [float(x) for x in _csv_list(fractions)]
    except ValueError:
        raise ConfigError(f"--fractions {fractions!r} must be three numbers like 0.8,0.1,0.1") from None
    cfg = build_config(
        SplitConfig,
        {
            "manifest": manifest,
            "out": out,
            "fractions": fr,
            "seed": seed,
            "per_class": per_class,
            "exclude_flagged": _csv_list(exclude_flagged),
            "audit": audit_dir,
            "near_dup_threshold": near_dup_threshold,
            "holdout_sources": tuple(holdout_source),
            "name": name,
            "wandb": wandb,
            "wandb_project": wandb_project,
            "progress": progress,
        },
        source="cxrlab data split",
    )
    res = split(cfg)
    names = res.split_names
    t = Table(title=f"split {res.dataset_version}: {res.n_images} images, {res.n_groups} groups", title_justify="left")
    t.add_column("class", style="bold")
    for s in names:
        t.add_column(s, justify="right")
    t.add_column("total", justify="right")
    for c in res.classes:
        t.add_row(c, *[str(res.counts[c][s]) for s in names], str(sum(res.counts[c].values())))
    t.add_section()
    t.add_row("total", *[str(sum(res.counts[c][s] for c in res.classes)) for s in names], str(res.n_images))
    console.print(t)
    if len(res.counts_by_source) > 1 or res.holdout_sources:
        console.print(source_table(res.counts_by_source, names, "images per source and split"))
    rows: list[tuple[str, Any]] = [
        ("dataset version", res.dataset_version),
        ("near-duplicate pairs", res.n_near_dup_pairs),
        ("excluded", f"{len(res.excluded)}" + (f"  (see {res.excluded_path})" if res.excluded else "")),
        ("split", res.split_path),
        ("metadata", res.meta_path),
    ]
    if res.wandb_artifact:
        rows.append(("W&B artifact", f"{res.wandb_artifact} (type dataset) in {res.wandb_dir}"))
    console.print(_kv_table(None, rows))
    _warn(res.warnings)
    console.print(f"next: cxrlab data audit {res.out} --out <DIR>   or   cxrlab train --data {res.out}")


# ---------------------------------------------------------------------------------------------------- audit


@data_app.command("audit")
def audit_cmd(
    data: Path = typer.Argument(
        ...,
        help="manifest.csv or split.csv, or the folder holding one (a split adds per-split counts).",
        show_default=False,
    ),
    out: Path = from_field(AuditConfig, "out", "--out", "-o"),
    workers: int = from_field(AuditConfig, "workers", "--workers"),
    seed: int = from_field(AuditConfig, "seed", "--seed"),
    near_dup_threshold: int = from_field(AuditConfig, "near_dup_threshold", "--near-dup-threshold"),
    blur_threshold: float = from_field(AuditConfig, "blur_threshold", "--blur-threshold"),
    dark_mean: float = from_field(AuditConfig, "dark_mean", "--dark-mean"),
    bright_mean: float = from_field(AuditConfig, "bright_mean", "--bright-mean"),
    low_contrast_std: float = from_field(AuditConfig, "low_contrast_std", "--low-contrast-std"),
    progress: bool = from_field(AuditConfig, "progress", "--progress/--no-progress"),
) -> None:
    """Measure every image (size, exposure, sharpness, burned-in text, duplicates) and score how well these
    trivial statistics alone predict the label (the confound score); writes a self-contained audit.html."""
    from cxrlab.data.audit import FLAGS, audit

    cfg = build_config(
        AuditConfig,
        {
            "data": data,
            "out": out,
            "workers": workers,
            "seed": seed,
            "near_dup_threshold": near_dup_threshold,
            "blur_threshold": blur_threshold,
            "dark_mean": dark_mean,
            "bright_mean": bright_mean,
            "low_contrast_std": low_contrast_std,
            "progress": progress,
        },
        source="cxrlab data audit",
    )
    res = audit(cfg)
    cols = list(next(iter(res.counts.values())).keys()) if res.counts else []
    t = Table(title=f"audit: {res.n_images} images in {res.elapsed_s:.1f} s", title_justify="left")
    t.add_column("class", style="bold")
    for s in cols:
        t.add_column(s, justify="right")
    for f in ("text", "blur", "underexposed", "overexposed", "low_contrast", "duplicate"):
        t.add_column(f, justify="right")
    for c in res.classes:
        cells = [str(res.counts[c][s]) for s in cols]
        cells += [f"{res.flag_share[f][c]:.0%}" for f in ("text", "blur", "underexposed", "overexposed")]
        cells += [f"{res.flag_share[f][c]:.0%}" for f in ("low_contrast", "duplicate")]
        t.add_row(c, *cells)
    console.print(t)
    conf = res.confound
    if "all" in conf:
        ct = Table(title="confound score (cross-validated, trivial statistics only)", title_justify="left")
        ct.add_column("features", style="bold")
        ct.add_column("balanced acc.", justify="right")
        ct.add_column("accuracy", justify="right")
        ct.add_row("chance", f"{conf['chance_balanced_accuracy']:.2f}", f"{conf['chance_accuracy']:.2f}")
        ct.add_row("all", f"{conf['all']['balanced_accuracy']:.2f}", f"{conf['all']['accuracy']:.2f}")
        for g, v in conf["groups"].items():
            ct.add_row(g, f"{v['balanced_accuracy']:.2f}", f"{v['accuracy']:.2f}")
        console.print(ct)
    sa = res.sources
    if sa.get("table"):
        console.print(source_table(sa["table"], res.classes, "images per source"))
        spc = sa.get("source_predicts_class")
        if spc and sa["n_sources"] > 1:
            console.print(
                f"source alone -> class: balanced accuracy {spc['balanced_accuracy']:.2f} (chance "
                f"{spc['chance_balanced_accuracy']:.2f}), accuracy {spc['accuracy']:.2f}, "
                f"Cramer's V {spc['cramers_v']:.2f}"
            )
        for s, c in sa.get("per_source_confound", {}).items():
            if "all" in c:
                console.print(
                    f"confound score within {s}: balanced accuracy {c['all']['balanced_accuracy']:.2f} "
                    f"(chance {c['chance_balanced_accuracy']:.2f})"
                )
    rows: list[tuple[str, Any]] = [
        ("unreadable", res.n_unreadable),
        ("duplicate pairs", f"{res.duplicates['exact_pairs']} exact, {res.duplicates['near_pairs']} near, "
         f"{res.duplicates['cross_split_pairs']} across splits"),
        ("report", res.html_path),
        ("summary", res.json_path),
        ("features", f"{res.features_path}  (flags: {', '.join(FLAGS)})"),
        ("duplicates", res.duplicates_path),
    ]  # fmt: skip
    console.print(_kv_table(None, rows))
    _warn(res.warnings)
