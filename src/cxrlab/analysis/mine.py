"""Similar-image mining: for the images a model got wrong, the most similar images of an unlabelled pool.

``mine(MineConfig) -> MineResult``:

1. Queries: the run's errors on a split of its data (``split``, default test), or any chosen images (``images``: a
   folder, or a CSV/text file listing paths).
2. Embeddings: the model's penultimate layer (timm's ``forward_head(..., pre_logits=True)``: the pooled features
   the classifier reads), L2-normalised, so the inner product is the cosine similarity. The pool folder (any size,
   walked recursively) is embedded in batches with a progress bar; every embedding is cached by the sha256 of the
   file's bytes (``<run>/mine-cache/<model fingerprint>/``, one ``.npz`` shard per run), so a re-run decodes and
   embeds only files it has not seen.
3. De-duplication: pool images whose sha256 equals, or whose perceptual hash is within ``near_dup_threshold`` bits
   of, an image of the run's split (the ``phash`` column of split.csv; ``dedup_against="train"`` uses only the
   training images, default ``"split"``: every labelled image, so no query finds itself) are dropped before the
   search.
4. Search: the ``k`` nearest pool images (cosine distance = 1 - similarity) of each query, by :class:`ExactIndex`
   (blocked numpy matrix product, exact) or a faiss approximate index (:class:`FaissIndex`: HNSW or IVF) behind
   the same ``add`` / ``search`` interface; ``index="auto"`` is exact below ``exact_max`` pool images and HNSW
   above (benchmarks/bench_mine.py measures recall@10 against exact search and the time per 10,000 images).

Outputs in ``out`` (default ``<run>/mine-<split>``): ``gallery.html`` (self-contained: each error with its
neighbours and distances, thumbnails inlined), ``neighbours.csv`` (one row per error and rank), ``to_label.csv``
(each found pool image once: ``path,label`` with the label empty and a suggested label; fill ``label`` in and
``cxrlab data ingest to_label.csv --out DIR`` reads it, rows left blank become rejects) and ``mine.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrlab.analysis.configs import MineConfig
from cxrlab.analysis.neighbours import make_index
from cxrlab.atomic import write_json
from cxrlab.errors import MineError
from cxrlab.report.mine_page import write_mine_page
from cxrlab.runs import WEIGHTS_FILE

CACHE_DIR = "mine-cache"
NEIGHBOURS_CSV = "neighbours.csv"
TO_LABEL_CSV = "to_label.csv"
GALLERY_HTML = "gallery.html"
SUMMARY_JSON = "mine.json"


@dataclass
class MineResult:
    out_dir: Path
    gallery: Path
    neighbours_csv: Path
    to_label_csv: Path
    summary_json: Path
    n_queries: int
    n_pool: int  # images found in the pool folder
    n_pool_embedded: int  # newly embedded this run (the rest came from the cache)
    n_pool_cached: int
    n_duplicates: int  # pool images dropped as duplicates of the split
    n_unreadable: int
    n_searched: int  # pool images searched
    index: str
    neighbours: pd.DataFrame
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- embeddings


def model_fingerprint(bundle: Any) -> str:
    """What the embeddings depend on: the weights and the preprocessing."""
    from cxrlab.inference.bundle import file_sha256

    meta = bundle.meta
    w = bundle.weights_path or (Path(bundle.path) / WEIGHTS_FILE)
    parts = [file_sha256(w) if Path(w).is_file() else str(w), meta.model_name, str(list(meta.img_size))]
    parts += [
        json.dumps(meta.preprocess, sort_keys=True, default=str),
        str(meta.mean),
        str(meta.std),
        str(meta.in_chans),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class EmbeddingCache:
    """sha256 of a file's bytes -> (embedding, pHash), in ``.npz`` shards under one folder per model."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.vectors: dict[str, np.ndarray] = {}
        self.phash: dict[str, str] = {}
        self._new: list[tuple[str, np.ndarray, str]] = []
        if self.folder.is_dir():
            for shard in sorted(self.folder.glob("shard-*.npz")):
                try:
                    with np.load(shard, allow_pickle=False) as z:
                        for s, v, p in zip(z["sha256"], z["vectors"], z["phash"], strict=True):
                            self.vectors[str(s)] = v
                            self.phash[str(s)] = str(p)
                except Exception:  # a damaged shard (killed run): its files are embedded again
                    continue

    def get(self, sha: str) -> tuple[np.ndarray, str] | None:
        v = self.vectors.get(sha)
        return None if v is None else (v, self.phash[sha])

    def put(self, sha: str, vec: np.ndarray, phash: str) -> None:
        self.vectors[sha], self.phash[sha] = vec, phash
        self._new.append((sha, vec, phash))

    def flush(self) -> None:
        if not self._new:
            return
        from cxrlab.atomic import atomic_open

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{time.strftime('%Y%m%d-%H%M%S')}-{hashlib.sha1(self._new[0][0].encode()).hexdigest()[:6]}.npz"
        with atomic_open(self.folder / name, "wb") as f:
            np.savez(
                f,
                sha256=np.array([s for s, _, _ in self._new]),
                vectors=np.stack([v for _, v, _ in self._new]).astype(np.float32),
                phash=np.array([p for _, _, p in self._new]),
            )
        self._new = []


@dataclass
class Embedded:
    paths: list[str]
    sha256: list[str]
    phash: list[str]
    vectors: np.ndarray  # n x d, L2-normalised
    probs: np.ndarray | None  # n x classes (queries only)
    skipped: list[dict[str, str]]
    n_new: int = 0
    n_cached: int = 0


def embed_files(
    bundle: Any,
    paths: list[str],
    batch_size: int,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    desc: str = "embed",
    with_probs: bool = False,
) -> Embedded:
    """Embed image files in batches (cached by content hash when ``cache`` is given): the content hashes first, so
    a file already embedded is not decoded; the others go through the one read loop and forward pass
    (:mod:`cxrlab.inference.infer`)."""
    from cxrlab.data.grouping import image_phash
    from cxrlab.inference.bundle import file_sha256
    from cxrlab.inference.infer import forward_pass, read_batches

    n = len(paths)
    sha: list[str] = [""] * n
    phash: list[str] = [""] * n
    vecs: list[np.ndarray | None] = [None] * n
    probs: list[np.ndarray | None] = [None] * n
    skipped: list[dict[str, str]] = []
    todo: list[int] = []
    for i, path in enumerate(paths):
        try:
            sha[i] = file_sha256(path)
        except OSError as e:
            skipped.append({"path": path, "reason": e.strerror or str(e)})
            continue
        hit = cache.get(sha[i]) if (cache is not None and not with_probs) else None
        if hit is None:
            todo.append(i)
        else:
            vecs[i], phash[i] = hit

    def prepare(gray: np.ndarray) -> tuple[str, torch.Tensor]:
        return image_phash(gray), bundle.preprocess(gray)

    try:
        for batch in read_batches([paths[i] for i in todo], batch_size, skipped, progress, desc, prepare=prepare):
            if not batch.indices:
                continue
            p, f = forward_pass(bundle.model, torch.stack([t for _, t in batch.inputs]), features=True)
            f = torch.nn.functional.normalize(torch.from_numpy(f), dim=1).numpy()
            for k, v, pr, (ph, _) in zip(batch.indices, f, p, batch.inputs, strict=True):
                i = todo[k]
                vecs[i], probs[i], phash[i] = v, pr, ph
                if cache is not None:
                    cache.put(sha[i], v, ph)
    finally:
        if cache is not None:
            cache.flush()
    keep = [i for i in range(n) if vecs[i] is not None]
    dim = next((len(vecs[i]) for i in keep), 0)
    mat = np.stack([vecs[i] for i in keep]).astype(np.float32) if keep else np.zeros((0, dim), np.float32)
    pr = np.stack([probs[i] for i in keep]) if with_probs and keep else None
    n_cached = sum(probs[i] is None for i in keep)
    kept_paths, kept_sha, kept_phash = [paths[i] for i in keep], [sha[i] for i in keep], [phash[i] for i in keep]
    return Embedded(kept_paths, kept_sha, kept_phash, mat, pr, skipped, len(keep) - n_cached, n_cached)


# ------------------------------------------------------------------------------------------- inputs


def list_pool(pool: Path) -> list[str]:
    """Image files under ``pool`` (recursively, name order)."""
    from cxrlab.data.walk import classify_file, walk

    pool = Path(pool)
    if not pool.is_dir():
        raise MineError(f"pool folder not found: {pool} (pass --pool DIR, a folder of images to search)")
    files = [str(f.path) for f in walk(pool) if f.verdict == "file" and classify_file(f.path) is None]
    if not files:
        raise MineError(f"no images found under {pool}: put PNG/JPEG/DICOM files there (any sub-folders)")
    return files


def list_images(images: Path) -> list[str]:
    """Query images: a folder (recursively) or a CSV/text file with a path per row (column ``path`` if a header)."""
    images = Path(images)
    if images.is_dir():
        return list_pool(images)
    if not images.is_file():
        raise MineError(f"--images {images} not found: pass a folder of images or a CSV/text list of paths")
    if images.suffix.lower() == ".csv":
        df = pd.read_csv(images, dtype=str, keep_default_na=False)
        col = "path" if "path" in df.columns else df.columns[0]
        raw = df[col].tolist()
    else:
        raw = [ln.strip() for ln in images.read_text(encoding="utf-8").splitlines() if ln.strip()]
    base = images.parent
    out = [str(p if Path(p).is_absolute() else (base / p).resolve()) for p in raw]
    if not out:
        raise MineError(f"{images} lists no images")
    return out


def _split_hashes(split_table: pd.DataFrame) -> tuple[set[str], np.ndarray]:
    from cxrlab.data.grouping import PHASH_RE, phash_to_int

    sha = {str(s) for s in split_table.get("sha256", pd.Series(dtype=str)).astype(str) if s}
    ph = [p for p in split_table.get("phash", pd.Series(dtype=str)).astype(str) if PHASH_RE.fullmatch(p)]
    return sha, phash_to_int(ph) if ph else np.zeros(0, np.uint64)


def duplicate_mask(
    sha: list[str], phash: list[str], known_sha: set[str], known_ph: np.ndarray, threshold: int, block: int = 4096
) -> np.ndarray:
    """True where a pool image's sha256 is known or its pHash is within ``threshold`` bits of a known one."""
    from cxrlab.data.grouping import PHASH_RE

    dup = np.array([s in known_sha for s in sha], bool)
    if threshold < 0 or not len(known_ph) or not phash:
        return dup
    valid = np.array([bool(PHASH_RE.fullmatch(p)) for p in phash])
    h = np.array([int(p, 16) if v else 0 for p, v in zip(phash, valid, strict=True)], dtype=np.uint64)
    for a in range(0, len(h), block):
        d = np.bitwise_count(h[a : a + block, None] ^ known_ph[None, :])
        dup[a : a + block] |= (d.min(1) <= threshold) & valid[a : a + block]
    return dup


# ------------------------------------------------------------------------------------------- stage


def mine(cfg: MineConfig) -> MineResult:
    """Nearest pool neighbours of the run's errors (or the chosen images); gallery, CSVs, summary."""
    from cxrlab.data.items import resolve_items, run_split_dir
    from cxrlab.data.manifest import load_split
    from cxrlab.inference.bundle import load_bundle, resolve_bundle_dir
    from cxrlab.inference.infer import resolve_device
    from cxrlab.runs import find_run_dir, read_summary

    t0 = time.perf_counter()
    if not Path(cfg.target).exists():
        raise MineError(f"run not found: {cfg.target} (pass a run directory runs/<id> or a bundle)")
    bundle_dir = resolve_bundle_dir(cfg.target)
    run_dir = find_run_dir(bundle_dir)
    base = run_dir or bundle_dir
    bundle = load_bundle(bundle_dir, device=resolve_device(cfg.device))
    bundle.model.eval()
    meta = bundle.meta
    classes = list(meta.class_names)
    pool_files = list_pool(cfg.pool)

    split_dir = run_split_dir(run_dir, read_summary(run_dir), meta.config or {})
    if split_dir is None:
        raise MineError(
            f"{base} does not record the split it was trained on, so pool images cannot be checked against its "
            "training images; mine a run directory made by `cxrlab train`"
        )
    info = load_split(split_dir)
    known = info.table if cfg.dedup_against == "split" else info.subset("train")
    known_sha, known_ph = _split_hashes(known)
    secs: dict[str, float] = {}

    # queries
    t = time.perf_counter()
    if cfg.images is not None:
        qpaths, qlabels = list_images(cfg.images), None
    else:
        items = resolve_items(base, cfg.split, None, classes, meta.config or {})
        qpaths, qlabels = items.paths, dict(zip(items.paths, items.labels, strict=True))
    q = embed_files(bundle, qpaths, cfg.batch_size, None, cfg.progress, f"embed {cfg.split}", with_probs=True)
    pred = [classes[int(i)] for i in q.probs.argmax(1)] if q.probs is not None and len(q.probs) else []
    conf = q.probs.max(1).tolist() if q.probs is not None and len(q.probs) else []
    rows_q = [
        {"query": p, "label": (qlabels or {}).get(p, ""), "prediction": pr, "confidence": c, "i": i}
        for i, (p, pr, c) in enumerate(zip(q.paths, pred, conf, strict=True))
    ]
    if qlabels is not None:
        rows_q = [r for r in rows_q if r["label"] != r["prediction"]]
    rows_q.sort(key=lambda r: -r["confidence"])
    if cfg.max_queries:
        rows_q = rows_q[: cfg.max_queries]
    secs["queries"] = time.perf_counter() - t

    # pool
    t = time.perf_counter()
    cache = EmbeddingCache(Path(cfg.cache or base / CACHE_DIR) / model_fingerprint(bundle))
    pool = embed_files(bundle, pool_files, cfg.batch_size, cache, cfg.progress, "embed pool")
    secs["pool_embed"] = time.perf_counter() - t
    dup = duplicate_mask(pool.sha256, pool.phash, known_sha, known_ph, cfg.near_dup_threshold)
    keep = np.flatnonzero(~dup)

    # search
    t = time.perf_counter()
    out = Path(cfg.out) if cfg.out else base / (f"mine-{cfg.split}" if cfg.images is None else "mine-images")
    out.mkdir(parents=True, exist_ok=True)
    index = make_index(cfg.index, pool.vectors.shape[1] if len(pool.vectors) else 1, len(keep), cfg.exact_max)
    nb: list[dict[str, Any]] = []
    if rows_q and len(keep):
        index.add(pool.vectors[keep])
        sims, idx = index.search(q.vectors[[r["i"] for r in rows_q]], min(cfg.k, len(keep)))
        for r, srow, irow in zip(rows_q, sims, idx, strict=True):
            for rank, (s, j) in enumerate(zip(srow, irow, strict=True), start=1):
                if j < 0:
                    continue
                pj = int(keep[j])
                nb.append(
                    {
                        "query": r["query"],
                        "query_label": r["label"],
                        "query_prediction": r["prediction"],
                        "query_confidence": r["confidence"],
                        "rank": rank,
                        "path": pool.paths[pj],
                        "distance": float(1.0 - s),
                        "sha256": pool.sha256[pj],
                        "phash": pool.phash[pj],
                    }
                )
    secs["search"] = time.perf_counter() - t
    cols = [
        "query",
        "query_label",
        "query_prediction",
        "query_confidence",
        "rank",
        "path",
        "distance",
        "sha256",
        "phash",
    ]
    table = pd.DataFrame(nb, columns=cols)
    table.to_csv(out / NEIGHBOURS_CSV, index=False, float_format="%.6g")
    _write_to_label(table, out / TO_LABEL_CSV)
    write_mine_page(
        out / GALLERY_HTML, rows_q, table, base=base, pool=cfg.pool, k=cfg.k, images=cfg.images, thumb=cfg.thumb_size
    )
    res = MineResult(
        out_dir=out,
        gallery=out / GALLERY_HTML,
        neighbours_csv=out / NEIGHBOURS_CSV,
        to_label_csv=out / TO_LABEL_CSV,
        summary_json=out / SUMMARY_JSON,
        n_queries=len(rows_q),
        n_pool=len(pool_files),
        n_pool_embedded=pool.n_new,
        n_pool_cached=pool.n_cached,
        n_duplicates=int(dup.sum()),
        n_unreadable=len(pool.skipped),
        n_searched=len(keep),
        index=index.name,
        neighbours=table,
        skipped=q.skipped + pool.skipped,
    )
    secs["total"] = time.perf_counter() - t0
    res.seconds = secs
    doc = {
        "format": 1,
        "run": str(base),
        "model": meta.model_name,
        "queries": "errors" if cfg.images is None else str(cfg.images),
        "split": cfg.split,
        "pool": str(cfg.pool),
        "k": cfg.k,
        "index": index.name,
        "dedup_against": cfg.dedup_against,
        "near_dup_threshold": cfg.near_dup_threshold,
        **{k: v for k, v in res.__dict__.items() if k.startswith("n_")},
        "seconds": secs,
        "skipped": res.skipped,
    }
    write_json(out / SUMMARY_JSON, doc)
    return res


def _write_to_label(table: pd.DataFrame, path: Path) -> None:
    """Each found pool image once (its best rank): ``path,label`` for `cxrlab data ingest`, label left empty."""
    cols = ["path", "label", "suggested_label", "nearest_error", "distance"]
    if table.empty:
        pd.DataFrame(columns=cols).to_csv(path, index=False)
        return
    best = table.sort_values(["distance", "rank"]).drop_duplicates("path")
    df = pd.DataFrame(
        {
            "path": best["path"],
            "label": "",
            "suggested_label": best["query_label"],
            "nearest_error": best["query"],
            "distance": best["distance"],
        }
    )
    df.to_csv(path, index=False, float_format="%.6g")
