"""CLI command ``cxrlab mine RUN --pool DIR``: pool images similar to a run's errors (see ``cxrlab.analysis.mine``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def mine_cmd(
    target: Path = typer.Argument(..., help="Run directory (runs/<id>) or its bundle.", show_default=False),
    pool: Path = typer.Option(
        ..., "--pool", help="Folder of unlabelled images to search (walked recursively).", show_default=False
    ),
    split: str = typer.Option("test", "--split", help="Split whose misclassified images are the queries."),
    images: Path | None = typer.Option(
        None,
        "--images",
        help="Query these images instead of the errors: a folder, or a CSV (column 'path') / text list of paths.",
        show_default=False,
    ),
    k: int = typer.Option(10, "--k", "-k", min=1, max=1000, help="Neighbours per query."),
    index: str = typer.Option(
        "auto", "--index", help="auto (exact up to --exact-max pool images, faiss HNSW above) | exact | hnsw | ivf."
    ),
    exact_max: int = typer.Option(50_000, "--exact-max", min=0, help="index=auto: exact search up to this size."),
    dedup_against: str = typer.Option(
        "split",
        "--dedup-against",
        help="Drop pool images that duplicate (sha256 or pHash) the run's whole split, or only its train part.",
    ),
    near_dup_threshold: int = typer.Option(
        2, "--near-dup-threshold", min=-1, max=64, help="pHash Hamming distance counted as a duplicate (-1: off)."
    ),
    max_queries: int | None = typer.Option(
        None, "--max-queries", min=1, help="At most N queries (the most confident errors).", show_default=False
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default <run>/mine-<split>).", show_default=False
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Embedding cache folder (default <run>/mine-cache).", show_default=False
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Find pool images similar to the ones the model got wrong: penultimate-layer embeddings (cached by file
    content, so a re-run embeds only new files), cosine nearest neighbours, pool images already in the run's split
    dropped (sha256 / perceptual hash). Writes gallery.html, neighbours.csv and to_label.csv (fill in 'label',
    then `cxrlab data ingest to_label.csv --out DIR`)."""
    from cxrlab.analysis.mine import MineConfig, mine
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
