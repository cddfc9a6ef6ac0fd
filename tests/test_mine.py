"""Similar-image mining (``cxrlab mine``): neighbours never come from the run's split (exact copies and resized
near-duplicates of training images are dropped), the embedding cache makes a re-run embed only new files, the
exact search is exact and the faiss indexes reach recall@10 >= 0.95 against it, the outputs (gallery, CSVs) are
usable (to_label.csv goes through ``data ingest``), bad input gets a clear error, and the CLI works."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TEST_SEED
from cxrlab.analysis.mine import MineConfig, duplicate_mask, mine
from cxrlab.analysis.neighbours import ExactIndex, FaissIndex, make_index, recall_at_k
from cxrlab.errors import MineError


@pytest.fixture(scope="module")
def run_dir(tiny_bundle: Path, phantom_split: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run-mine"
    shutil.copytree(tiny_bundle, run / "bundle")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": str(phantom_split)}))
    (run / "summary.json").write_text(json.dumps({"run_id": "run-mine", "data": str(phantom_split)}))
    return run


@pytest.fixture(scope="module")
def pool(phantom_split: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """New phantoms (another seed) + an exact copy and a resized copy of training images + a non-image."""
    from cxrlab.data.synth import SynthConfig, generate

    d = tmp_path_factory.mktemp("pool")
    generate(SynthConfig(out=d / "new", n_per_class=6, size=96, seed=TEST_SEED + 1000))
    train = pd.read_csv(phantom_split / "split.csv").query("split == 'train'")["path"].tolist()
    (d / "copies").mkdir()
    shutil.copy(train[0], d / "copies" / "exact.png")
    g = cv2.imread(train[1], cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(d / "copies" / "resized.jpg"), cv2.resize(g, (80, 80), interpolation=cv2.INTER_AREA))
    (d / "notes.png").write_text("not an image")
    return d


def test_neighbours_never_come_from_the_split_and_outputs_are_usable(run_dir: Path, pool: Path, tmp_path) -> None:
    from cxrlab.data.grouping import phash_to_int
    from cxrlab.data.ingest import IngestConfig, ingest
    from cxrlab.data.manifest import load_split

    res = mine(MineConfig(target=run_dir, pool=pool, k=5, out=tmp_path / "out", cache=tmp_path / "c", progress=False))
    assert res.n_queries > 0, "the untrained tiny model should make errors on the phantom test split"
    assert res.n_pool == 18 + 2 + 1 and res.n_unreadable == 1
    assert res.n_duplicates >= 2 and res.n_searched == res.n_pool - res.n_unreadable - res.n_duplicates
    t = res.neighbours
    assert len(t) == res.n_queries * 5
    assert all(r == [1, 2, 3, 4, 5] for r in t.groupby("query")["rank"].apply(list))
    assert (t["distance"].diff()[t["rank"] > 1] >= -1e-6).all()  # sorted by distance within a query
    assert not t["path"].str.contains("copies").any()
    split = load_split(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]).table
    assert not set(t["sha256"]) & set(split["sha256"])
    d = np.bitwise_count(phash_to_int(t["phash"])[:, None] ^ phash_to_int(split["phash"])[None, :])
    assert d.min() > 2
    # the gallery is self-contained (thumbnails inlined) and shows every query
    page = res.gallery.read_text()
    assert (
        "http://" not in page
        and "https://" not in page
        and page.count("data:image/jpeg;base64,") == len(t) + (res.n_queries)
    )
    # to_label.csv: each found image once; filled in, `data ingest` reads it
    tl = pd.read_csv(res.to_label_csv, keep_default_na=False)
    assert sorted(tl["path"]) == sorted(set(t["path"])) and (tl["label"] == "").all()
    tl["label"] = tl["suggested_label"]
    tl.to_csv(tmp_path / "labelled.csv", index=False)
    ing = ingest(IngestConfig(src=tmp_path / "labelled.csv", out=tmp_path / "ingested", workers=0, progress=False))
    assert pd.read_csv(ing.manifest_path)["path"].nunique() == len(tl)
    doc = json.loads(res.summary_json.read_text())
    assert doc["n_queries"] == res.n_queries and doc["index"] == "exact"


def test_cache_embeds_only_new_files_on_a_rerun(run_dir: Path, pool: Path, tmp_path: Path) -> None:
    cfg = dict(target=run_dir, k=3, cache=tmp_path / "cache", progress=False, max_queries=2)
    p = tmp_path / "pool"
    shutil.copytree(pool / "new", p)
    first = mine(MineConfig(pool=p, out=tmp_path / "a", **cfg))
    assert first.n_pool_embedded == 18 and first.n_pool_cached == 0
    again = mine(MineConfig(pool=p, out=tmp_path / "b", **cfg))
    assert again.n_pool_embedded == 0 and again.n_pool_cached == 18
    pd.testing.assert_frame_equal(first.neighbours, again.neighbours)
    shutil.copy(next((pool / "copies").glob("resized.jpg")), p / "added.jpg")  # one new file (a split duplicate)
    third = mine(MineConfig(pool=p, out=tmp_path / "c", **cfg))
    assert third.n_pool_embedded == 1 and third.n_pool_cached == 18 and third.n_duplicates == first.n_duplicates + 1


def test_chosen_images_as_queries(run_dir: Path, pool: Path, tmp_path: Path) -> None:
    listing = tmp_path / "q.csv"
    chosen = sorted((pool / "new" / "NORMAL").glob("*"))[:2]
    pd.DataFrame({"path": [str(c) for c in chosen]}).to_csv(listing, index=False)
    res = mine(MineConfig(target=run_dir, pool=pool / "new", images=listing, k=2, dedup_against="train",
                          cache=tmp_path / "c", out=tmp_path / "o", progress=False))  # fmt: skip
    assert res.n_queries == 2
    top = res.neighbours[res.neighbours["rank"] == 1]
    assert sorted(top["path"]) == sorted(map(str, chosen)) and (top["distance"].abs() < 1e-5).all()  # itself


def test_bad_input_names_the_path(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MineError, match=r"pool folder not found: .*nowhere.*--pool"):
        mine(MineConfig(target=run_dir, pool=tmp_path / "nowhere", progress=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MineError, match=r"no images found under .*empty"):
        mine(MineConfig(target=run_dir, pool=tmp_path / "empty", progress=False))
    with pytest.raises(MineError, match="run not found"):
        mine(MineConfig(target=tmp_path / "norun", pool=tmp_path / "empty", progress=False))


# ------------------------------------------------------------------------------------------------ indexes


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(4, n // 50), d))
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_index_is_exact_across_blocks() -> None:
    x, q = _clustered(1000, 32, 0), _clustered(20, 32, 1)
    idx = ExactIndex(32, block=128)
    idx.add(x[:500])
    idx.add(x[500:])
    s, i = idx.search(q, 10)
    ref = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    assert (np.sort(i, 1) == np.sort(ref, 1)).all()
    assert np.allclose(s, np.take_along_axis(q @ x.T, i, 1)) and (np.diff(s, axis=1) <= 1e-6).all()
    s, i = ExactIndex(32).search(q, 3)  # empty pool
    assert (i == -1).all()
    small = ExactIndex(32)
    small.add(x[:2])
    assert (small.search(q, 5)[1][:, 2:] == -1).all()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_faiss_recall_at_10_against_exact(kind: str) -> None:
    x, q = _clustered(5000, 64, 2), _clustered(100, 64, 3)
    ex = ExactIndex(64)
    ex.add(x)
    ann = FaissIndex(64, kind)  # type: ignore[arg-type]
    ann.add(x)
    r = recall_at_k(ann.search(q, 10)[1], ex.search(q, 10)[1])
    assert r >= 0.95, r
    assert make_index("auto", 64, 10, exact_max=100).name == "exact"
    assert make_index("auto", 64, 1000, exact_max=100).name == "hnsw"


def test_duplicate_mask_by_sha_and_phash() -> None:
    known = np.array([0x0F0F0F0F0F0F0F0F], dtype=np.uint64)
    m = duplicate_mask(
        ["a", "b", "c", "d"],
        ["0f0f0f0f0f0f0f0f", "0f0f0f0f0f0f0f0c", "f0f0f0f0f0f0f0f0", ""],
        {"c"},
        known,
        threshold=2,
    )
    assert m.tolist() == [True, True, True, False]
    assert duplicate_mask(["a"], ["0f0f0f0f0f0f0f0f"], set(), known, threshold=-1).tolist() == [False]


def test_cli_help_and_run(run_dir: Path, pool: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from cxrlab.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["mine", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--pool" in out and "--index" in out and "to_label.csv" in out
    args = ["mine", str(run_dir), "--pool", str(pool / "new"), "-k", "2", "--out", str(tmp_path / "o"), "-q"]
    assert main([*args, "--cache", str(tmp_path / "c"), "--index", "hnsw"]) == 0
    out = capsys.readouterr().out
    assert "searched with hnsw" in out and "gallery.html" in out
    assert main(["mine", str(run_dir), "--pool", str(tmp_path / "missing")]) == 2
    assert "pool folder not found" in capsys.readouterr().err
