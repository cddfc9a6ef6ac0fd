"""One way to map a per-image function over many files: a small process pool with a progress bar."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")

POOL_MIN_ITEMS = 32  # below this a process pool costs more than it saves


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # the pool already uses every core; OpenCV's own threads would only contend


def map_files(fn: Callable[[str], T], paths: Sequence[str], workers: int, label: str, progress: bool) -> list[T]:
    """``[fn(p) for p in paths]`` in order, on up to ``workers`` processes, with a rich progress bar on stderr.

    ``fn`` must be a module-level function (it is pickled by name). The pool uses spawn, not fork: a forked
    child inherits OpenCV's/OpenMP's thread-pool state from a parent that already used them (a test session, a
    notebook) and can deadlock on its first cv2 call.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    workers = max(1, min(workers, os.cpu_count() or 1, len(paths)))
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    out: list[T] = []
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task(label, total=len(paths))
        if workers <= 1 or len(paths) < POOL_MIN_ITEMS:
            for p in paths:
                out.append(fn(p))
                bar.advance(task)
            return out
        chunk = max(1, min(64, len(paths) // (workers * 8)))
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
            for r in pool.map(fn, paths, chunksize=chunk):
                out.append(r)
                bar.advance(task)
    return out
