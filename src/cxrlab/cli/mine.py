"""CLI command ``cxrlab mine RUN --pool DIR``: pool images similar to a run's errors (see ``cxrlab.analysis.mine``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cxrlab.analysis.configs import MineConfig
from cxrlab.cli.options import from_field

console = Console()
err_console = Console(stderr=True)


def mine_cmd(
    target: Path = typer.Argument(..., help="Run directory (runs/<id>) or its bundle.", show_default=False),
    pool: Path = from_field(MineConfig, "pool", "--pool"),
    split: str = from_field(MineConfig, "split", "--split"),
    images: Path | None = from_field(MineConfig, "images", "--images"),
    k: int = from_field(MineConfig, "k", "--k", "-k"),
    index: str = from_field(MineConfig, "index", "--index"),
    exact_max: int = from_field(MineConfig, "exact_max", "--exact-max"),
    dedup_against: str = from_field(MineConfig, "dedup_against", "--dedup-against"),
    near_dup_threshold: int = from_field(MineConfig, "near_dup_threshold", "--near-dup-threshold"),
    max_queries: int | None = from_field(MineConfig, "max_queries", "--max-queries"),
    out: Path | None = from_field(MineConfig, "out", "--out"),
    cache: Path | None = from_field(MineConfig, "cache", "--cache"),
    batch_size: int = from_field(MineConfig, "batch_size", "--batch-size"),
    device: str = from_field(MineConfig, "device", "--device"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Find pool images similar to the ones the model got wrong: penultimate-layer embeddings (cached by file
    content, so a re-run embeds only new files), cosine nearest neighbours, pool images already in the run's split
    dropped (sha256 / perceptual hash). Writes gallery.html, neighbours.csv and to_label.csv (fill in 'label',
    then `cxrlab data ingest to_label.csv --out DIR`)."""
    from cxrlab.analysis.mine import mine
    from cxrlab.config import build_config

    cfg = build_config(
        MineConfig,
        {
            "target": target,
            "pool": pool,
            "split": split,
            "images": images,
            "k": k,
            "index": index,
            "exact_max": exact_max,
            "dedup_against": dedup_against,
            "near_dup_threshold": near_dup_threshold,
            "max_queries": max_queries,
            "out": out,
            "cache": cache,
            "batch_size": batch_size,
            "device": device,
            "progress": not quiet,
        },
        source="cxrlab mine options",
    )
    res = mine(cfg)
    for s in res.skipped[:10]:
        err_console.print(f"[yellow]skipped[/] {s['path']}: {s['reason']}")
    if len(res.skipped) > 10:
        err_console.print(f"[yellow]... {len(res.skipped) - 10} more unreadable files[/]")
    what = "errors" if images is None else "images"
    console.print(
        f"[bold]mine[/]: {res.n_queries} {what}, pool {res.n_pool} images ({res.n_pool_embedded} embedded, "
        f"{res.n_pool_cached} from the cache, {res.n_duplicates} already in the split, {res.n_unreadable} unreadable); "
        f"{res.n_searched} searched with {res.index}"
    )
    if res.n_queries == 0:
        console.print("[yellow]no queries[/] (the model made no error on this split)" if images is None else "")
    s = res.seconds
    console.print(
        f"[dim]embed pool {s.get('pool_embed', 0):.1f} s, search {s.get('search', 0):.2f} s, "
        f"total {s.get('total', 0):.1f} s[/]"
    )
    console.print(f"gallery:    {res.gallery}")
    console.print(f"neighbours: {res.neighbours_csv}")
    console.print(
        f"to label:   {res.to_label_csv}  (fill 'label', then: cxrlab data ingest {res.to_label_csv} --out DIR)"
    )


def register(app: typer.Typer) -> None:
    """Add ``mine`` to the root app (idempotent)."""
    if any(c.callback is mine_cmd for c in app.registered_commands):
        return
    app.command(
        "mine",
        short_help="Find pool images similar to the run's errors (penultimate-layer embeddings, cosine neighbours, "
        "split duplicates dropped): gallery + CSV to label.",
    )(mine_cmd)
