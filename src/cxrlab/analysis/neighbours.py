"""Nearest-neighbour search over L2-normalised embeddings behind one ``add`` / ``search`` interface: an exact
blocked numpy search (:class:`ExactIndex`) and faiss approximate indexes (:class:`FaissIndex`: HNSW or IVF);
``make_index`` chooses by pool size. Used by similar-image mining (``cxrlab.analysis.mine``)."""

from __future__ import annotations

from typing import Any, Literal, Protocol

import numpy as np

from cxrlab.errors import MineError


class NeighbourIndex(Protocol):
    """Cosine nearest neighbours of L2-normalised float32 vectors."""

    name: str

    def add(self, vectors: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices), each queries x k, best first; index -1 where the pool has fewer than k."""
        ...


class ExactIndex:
    """Exact search: blocked matrix product and a partial sort (the recall reference)."""

    name = "exact"

    def __init__(self, dim: int, block: int = 65536) -> None:
        self.dim, self.block = dim, block
        self._parts: list[np.ndarray] = []

    def add(self, vectors: np.ndarray) -> None:
        self._parts.append(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        base = np.concatenate(self._parts) if self._parts else np.zeros((0, self.dim), np.float32)
        n = len(base)
        best_s = np.full((len(q), k), -np.inf, np.float32)
        best_i = np.full((len(q), k), -1, np.int64)
        for a in range(0, n, self.block):
            s = q @ base[a : a + self.block].T
            s_all = np.concatenate([best_s, s], 1)
            i_all = np.concatenate([best_i, np.arange(a, a + s.shape[1])[None].repeat(len(q), 0)], 1)
            kk = min(k, s_all.shape[1])
            top = np.argpartition(-s_all, kk - 1, axis=1)[:, :kk]
            best_s = np.take_along_axis(s_all, top, 1)
            best_i = np.take_along_axis(i_all, top, 1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
        best_i[~np.isfinite(best_s)] = -1
        return best_s, best_i


class FaissIndex:
    """faiss approximate search over inner products: ``hnsw`` (graph; no training, ``ef_search`` trades speed for
    recall) or ``ivf`` (k-means cells; ``nprobe`` of ``nlist`` cells searched)."""

    def __init__(self, dim: int, kind: Literal["hnsw", "ivf"] = "hnsw", m: int = 32, ef_search: int = 128,
                 ef_construction: int = 80, nlist: int | None = None, nprobe: int = 32) -> None:  # fmt: skip
        try:
            import faiss
        except ImportError as e:  # pragma: no cover - locked dependency
            raise MineError("faiss is not installed (pip install faiss-cpu); use --index exact") from e
        self.faiss, self.dim, self.name = faiss, dim, kind
        self.m, self.ef_search, self.ef_construction = m, ef_search, ef_construction
        self.nlist, self.nprobe = nlist, nprobe
        self.index: Any = None
        self._pending: list[np.ndarray] = []

    def add(self, vectors: np.ndarray) -> None:
        self._pending.append(np.ascontiguousarray(vectors, dtype=np.float32))

    def _build(self) -> None:
        faiss = self.faiss
        x = np.concatenate(self._pending) if self._pending else np.zeros((0, self.dim), np.float32)
        self._pending = []
        if self.name == "hnsw":
            idx = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
            idx.hnsw.efConstruction = self.ef_construction
            idx.hnsw.efSearch = self.ef_search
        else:
            # sqrt(n) cells (faiss's rule of thumb; k-means stays cheap), at least 39 training points per cell
            nlist = self.nlist or max(1, min(int(np.sqrt(max(len(x), 1))), len(x) // 39))
            quant = faiss.IndexFlatIP(self.dim)
            idx = faiss.IndexIVFFlat(quant, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            if len(x):
                idx.train(x)
            idx.nprobe = min(self.nprobe, nlist)
            self._quant = quant  # keep the quantiser alive as long as the index
        if len(x):
            idx.add(x)
        self.index = idx

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None or self._pending:
            self._build()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.name == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        s, i = self.index.search(q, k)
        return s.astype(np.float32), i.astype(np.int64)


def make_index(kind: str, dim: int, n: int, exact_max: int = 50_000) -> NeighbourIndex:
    if kind == "auto":
        kind = "exact" if n <= exact_max else "hnsw"
    if kind == "exact":
        return ExactIndex(dim)
    if kind in ("hnsw", "ivf"):
        return FaissIndex(dim, kind)  # type: ignore[arg-type]
    raise MineError(f"unknown index {kind!r}: auto | exact | hnsw | ivf")


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact k nearest neighbours that the approximate search also returned."""
    hits = [len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum()) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits)) if hits else float("nan")
