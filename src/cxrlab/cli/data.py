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

from cxrlab.config import build_config

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
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder: manifest.csv, rejects.csv, ingest.json.", show_default=False
    ),
    patient_regex: str | None = typer.Option(
        None,
        "--patient-regex",
        help=r"Regex on the file name giving the patient id (first group, else the whole match), "
        r"e.g. '(person\d+)_' for Kermany names. Default: CSV column, SOURCES.csv, else one patient per image.",
    ),
    source_regex: str | None = typer.Option(
        None,
        "--source-regex",
        help="Regex on the path below the root's parent (root/class/file) giving the source (first group, else "
        "the whole match). Default: CSV column, SOURCES.csv, else the root folder's name.",
    ),
    source_column: str = typer.Option(
        "source", "--source-column", help="Column naming the source in a CSV listing or a SOURCES.csv."
    ),
    source_name: list[str] = typer.Option(
        [], "--source-name", help="Source name of each root, in order (repeatable); overrides SOURCES.csv."
    ),
    csv: bool = typer.Option(
        False, "--csv", help="Read SRC as a CSV listing even without a .csv suffix (automatic for *.csv)."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Exit with an error when any file is rejected (the outputs are still written)."
    ),
    workers: int = typer.Option(2, "--workers", min=0, help="Decoder processes (0 or 1 = in-process)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Decode every image once and write a manifest (path, label, sha256, size, mode, bit depth, patient id,
    original split, perceptual hash, source) plus rejects.csv with a reason for every file that could not be read."""
    from cxrlab.data.ingest import IngestConfig, IngestRejectsError, ingest

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
            "csv": True if csv else None,
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
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder; phantoms are written to OUT/<class>/*.png.", show_default=False
    ),
    n_per_class: int = typer.Option(100, "--n-per-class", "-n", min=1, help="Phantoms per class."),
    size: int = typer.Option(256, "--size", min=32, help="Image side in pixels (square)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed -> same images)."),
    shortcut_class: str | None = typer.Option(
        None,
        "--shortcut-class",
        help="Plant a burned-in text marker in this class only: a known shortcut for testing audit/explain.",
    ),
    shortcut_prob: float = typer.Option(
        1.0, "--shortcut-prob", min=0.0, max=1.0, help="Share of the shortcut class's images that get the marker."
    ),
    marker_all: bool = typer.Option(False, "--marker-all", help="Put markers on every class (no shortcut)."),
) -> None:
    """Write synthetic chest radiograph phantoms (COVID19 / NORMAL / PNEUMONIA), one folder per class:
    the embedded default data set (nothing is downloaded)."""
    from cxrlab.data.manifest import DataError
    from cxrlab.data.synth import CLASSES, SynthConfig, generate

    if shortcut_class is not None and shortcut_class not in CLASSES:
        raise DataError(f"--shortcut-class {shortcut_class!r} is not a phantom class; valid: {', '.join(CLASSES)}")
    res = generate(
        SynthConfig(
            out=out,
            n_per_class=n_per_class,
            size=size,
            seed=seed,
            shortcut_class=shortcut_class,
            shortcut_prob=shortcut_prob,
            marker_all=marker_all,
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
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder: split.csv, split.json, excluded.csv.", show_default=False
    ),
    fractions: str = typer.Option("0.8,0.1,0.1", "--fractions", help="train,val,test shares (sum 1)."),
    seed: int = typer.Option(42, "--seed", help="Random seed (same manifest + seed -> byte-identical split)."),
    per_class: int | None = typer.Option(
        None, "--per-class", min=1, help="Draw a balanced subset of N images per class (whole groups) first."
    ),
    exclude_flagged: str = typer.Option(
        "",
        "--exclude-flagged",
        help="Leave out images the audit flagged: comma list of blur, exposure (under/over/low contrast), "
        "underexposed, overexposed, low_contrast, text, unreadable. Needs --audit.",
    ),
    audit_dir: Path | None = typer.Option(None, "--audit", help="Audit folder (or its audit_features.csv)."),
    near_dup_threshold: int = typer.Option(
        2, "--near-dup-threshold", min=-1, max=64, help="Max pHash Hamming distance of near duplicates (-1: off)."
    ),
    holdout_source: list[str] = typer.Option(
        [],
        "--holdout-source",
        help="Put every image of this source in an 'external' split, never in train/val/test (repeatable).",
    ),
    name: str | None = typer.Option(
        None, "--name", help="Dataset name for the W&B artifact data-<name>-split (default xray / xray-tiny)."
    ),
    wandb: str = typer.Option(
        "off", "--wandb", help="Log the split as a W&B dataset artifact: auto|online|offline|off."
    ),
    wandb_project: str = typer.Option("cxrlab", "--wandb-project", help="W&B project."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Grouped (patient, sha256, near-duplicate), stratified, seeded train/val/test split of a manifest, with a
    dataset version id derived from its content."""
    from cxrlab.config import ConfigError
    from cxrlab.data.split import SplitConfig, split

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
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Output folder: audit.html, audit.json, audit_features.csv, duplicates.csv.",
        show_default=False,
    ),
    workers: int = typer.Option(2, "--workers", min=0, help="Decoder processes (0 or 1 = in-process)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the confound score's cross-validation."),
    near_dup_threshold: int = typer.Option(
        2, "--near-dup-threshold", min=-1, max=64, help="Max pHash Hamming distance of near duplicates (-1: off)."
    ),
    blur_threshold: float = typer.Option(20.0, "--blur-threshold", help="Flag blur below this Laplacian variance."),
    dark_mean: float = typer.Option(70.0, "--dark-mean", help="Flag underexposed below this mean intensity."),
    bright_mean: float = typer.Option(185.0, "--bright-mean", help="Flag overexposed above this mean intensity."),
    low_contrast_std: float = typer.Option(20.0, "--low-contrast-std", help="Flag low contrast below this std."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Measure every image (size, exposure, sharpness, burned-in text, duplicates) and score how well these
    trivial statistics alone predict the label (the confound score); writes a self-contained audit.html."""
    from cxrlab.data.audit import FLAGS, AuditConfig, audit

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
