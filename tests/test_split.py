"""Contracts of cxrlab.data.split: grouping never crosses splits, per-class fractions, determinism, balanced
subset, audit exclusions, errors, W&B artifact; plus the real cxr-tiny folder grouped by SOURCES.csv patients."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxrlab.data.grouping import image_phash, largest_remainder, near_duplicate_pairs
from cxrlab.data.manifest import MANIFEST_COLUMNS, DataError, load_split
from cxrlab.data.split import SplitConfig, split


def _texture(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    small = rng.integers(0, 256, (8, 8)).astype(np.float32)
    return np.clip(cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


def _row(path: Path, label: str, patient: str) -> dict:
    data = path.read_bytes()
    g = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return {
        "path": str(path),
        "label": label,
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": g.shape[1],
        "height": g.shape[0],
        "mode": "L",
        "bit_depth": 8,
        "patient_id": patient,
        "source_split": "",
        "phash": image_phash(g),
    }


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3 classes (50/73/101 images) with multi-image patients, exact copies under other patient ids and
    re-encoded near copies under other patient ids. Returns the manifest path and the planted links."""
    root = tmp_path_factory.mktemp("grouped")
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    links: list[list[str]] = []  # each list: paths that must share a split
    sizes = {"A": 50, "B": 73, "C": 101}
    for label, n in sizes.items():
        d = root / label
        d.mkdir()
        i = 0
        pnum = 0
        while i < n:
            k = int(min(n - i, rng.choice([1, 1, 1, 2, 3, 5])))  # patient with k images
            paths = []
            for _ in range(k):
                p = d / f"{label}_{i:04d}.png"
                cv2.imwrite(str(p), _texture(rng))
                rows.append(_row(p, label, f"{label}-p{pnum}"))
                paths.append(str(p))
                i += 1
            if k > 1:
                links.append(paths)
            pnum += 1
    # exact copies (same bytes) under a fresh patient id, and JPEG re-encodes (near duplicates)
    base = [r for r in rows if r["label"] == "C"][:6]
    for j, r in enumerate(base[:3]):
        p = root / "C" / f"copy_{j}.png"
        shutil.copy(r["path"], p)
        rows.append(_row(p, "C", f"copy-{j}"))
        links.append([r["path"], str(p)])
    for j, r in enumerate(base[3:]):
        p = root / "C" / f"reenc_{j}.jpg"
        g = cv2.imread(r["path"], cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(p), cv2.resize(g, (48, 48), interpolation=cv2.INTER_AREA), [cv2.IMWRITE_JPEG_QUALITY, 60])
        rows.append(_row(p, "C", f"reenc-{j}"))
        links.append([r["path"], str(p)])
    man = root / "manifest.csv"
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(man, index=False)
    counts = pd.DataFrame(rows)["label"].value_counts().to_dict()
    return {"manifest": man, "links": links, "counts": counts, "root": root}


def _run(grouped: dict, out: Path, **kw) -> tuple:
    res = split(SplitConfig(manifest=grouped["manifest"], out=out, progress=False, **kw))
    return res, load_split(out)


def test_groups_never_cross_splits(grouped: dict, tmp_path: Path) -> None:
    res, info = _run(grouped, tmp_path / "s")
    t = info.table.set_index("path")
    assert len(t) == sum(grouped["counts"].values())
    for paths in grouped["links"]:
        assert t.loc[paths, "split"].nunique() == 1, paths
        assert t.loc[paths, "group"].nunique() == 1, paths
    # every group (patient / sha / near-dup component) sits in one split
    assert (info.table.groupby("group")["split"].nunique() == 1).all()
    assert res.n_near_dup_pairs >= 3  # the re-encoded copies were found by pHash
    assert res.n_groups == info.table["group"].nunique()


def test_fractions_within_one_image_per_class(grouped: dict, tmp_path: Path) -> None:
    res, info = _run(grouped, tmp_path / "s", fractions=(0.7, 0.15, 0.15))
    for label, n in grouped["counts"].items():
        got = info.table[info.table["label"] == label]["split"].value_counts()
        for split_name, frac in zip(("train", "val", "test"), (0.7, 0.15, 0.15), strict=True):
            assert abs(int(got.get(split_name, 0)) - n * frac) <= 1.0, (label, split_name, got.to_dict())
        assert res.counts[label] == {s: int(got.get(s, 0)) for s in ("train", "val", "test")}
    meta = json.loads((tmp_path / "s" / "split.json").read_text())
    assert meta["dataset_version"] == res.dataset_version == info.dataset_version
    assert meta["classes"] == ["A", "B", "C"]


def test_deterministic_and_order_independent(grouped: dict, tmp_path: Path) -> None:
    r1, _ = _run(grouped, tmp_path / "a")
    r2, _ = _run(grouped, tmp_path / "b")
    for f in ("split.csv", "split.json", "excluded.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert r1.dataset_version == r2.dataset_version
    assert r1.dataset_version.startswith("xray-") and len(r1.dataset_version) == len("xray-") + 12
    # the manifest's row order does not matter
    shuffled = tmp_path / "shuffled.csv"
    pd.read_csv(grouped["manifest"], dtype=str).sample(frac=1.0, random_state=3).to_csv(shuffled, index=False)
    r3 = split(SplitConfig(manifest=shuffled, out=tmp_path / "c", progress=False))
    assert r3.dataset_version == r1.dataset_version
    assert (tmp_path / "c" / "split.csv").read_bytes() == (tmp_path / "a" / "split.csv").read_bytes()
    # a different seed gives another assignment and id
    r4, _ = _run(grouped, tmp_path / "d", seed=43)
    assert r4.dataset_version != r1.dataset_version
    a = pd.read_csv(tmp_path / "a" / "split.csv").set_index("path")["split"]
    d = pd.read_csv(tmp_path / "d" / "split.csv").set_index("path")["split"]
    assert (a != d.loc[a.index]).any()


def test_per_class_balanced_subset(grouped: dict, tmp_path: Path) -> None:
    res, info = _run(grouped, tmp_path / "s", per_class=40)
    assert info.table["label"].value_counts().to_dict() == {"A": 40, "B": 40, "C": 40}
    assert (info.table.groupby("group")["split"].nunique() == 1).all()
    # whole groups only: a patient is either fully in or fully out
    full = pd.read_csv(grouped["manifest"], dtype=str)
    kept = set(info.table["path"])
    for _, g in full.groupby("patient_id"):
        inside = g["path"].isin(kept)
        assert inside.all() or not inside.any()
    assert res.warnings == []
    # more than a class has: take all of it and say so
    res2, info2 = _run(grouped, tmp_path / "s2", per_class=60)
    assert info2.table["label"].value_counts().to_dict() == {"A": 50, "B": 60, "C": 60}
    assert any("class A" in w for w in res2.warnings)


def test_exclude_flagged(grouped: dict, tmp_path: Path) -> None:
    full = pd.read_csv(grouped["manifest"], dtype=str)
    feats = pd.DataFrame({"path": full["path"], "label": full["label"]})
    for f in ("blur", "underexposed", "overexposed", "low_contrast", "text"):
        feats[f"flag_{f}"] = False
    feats.loc[[0, 1], "flag_blur"] = True
    feats.loc[[2], "flag_overexposed"] = True
    feats.loc[[3], "flag_text"] = True
    feats.loc[[1], "flag_underexposed"] = True
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    feats.to_csv(audit_dir / "audit_features.csv", index=False)
    res, info = _run(grouped, tmp_path / "s", exclude_flagged=("blur", "exposure"), audit=audit_dir)
    ex = pd.read_csv(tmp_path / "s" / "excluded.csv", dtype=str, keep_default_na=False)
    assert set(ex["path"]) == set(full["path"][[0, 1, 2]])
    reason = dict(zip(ex["path"], ex["reason"], strict=True))
    assert "blur" in reason[full["path"][1]] and "underexposed" in reason[full["path"][1]]
    assert "overexposed" in reason[full["path"][2]]
    assert set(ex["label"]) <= set(full["label"])
    assert not set(ex["path"]) & set(info.table["path"])
    assert full["path"][3] in set(info.table["path"])  # text was not asked for
    assert len(res.excluded) == 3
    with pytest.raises(DataError, match="audit"):
        split(SplitConfig(manifest=grouped["manifest"], out=tmp_path / "x", exclude_flagged=("blur",), progress=False))


def test_errors(grouped: dict, tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    pd.DataFrame(columns=MANIFEST_COLUMNS).to_csv(empty, index=False)
    with pytest.raises(DataError, match="no images"):
        split(SplitConfig(manifest=empty, out=tmp_path / "e", progress=False))
    # class D: 10 images of 2 patients cannot fill three splits (targets 8/1/1)
    full = pd.read_csv(grouped["manifest"], dtype=str)
    d = full[full["label"] == "A"].head(10).copy()
    d["label"] = "D"
    d["patient_id"] = ["d1"] * 5 + ["d2"] * 5
    bad = tmp_path / "bad.csv"
    pd.concat([full[full["label"] != "A"], d]).to_csv(bad, index=False)
    with pytest.raises(DataError, match="class D"):
        split(SplitConfig(manifest=bad, out=tmp_path / "b", progress=False))
    with pytest.raises(DataError, match="manifest not found"):
        split(SplitConfig(manifest=tmp_path / "nope.csv", out=tmp_path / "n", progress=False))
    with pytest.raises(ValueError, match="sum to 1"):
        SplitConfig(manifest=empty, out=tmp_path, fractions=(0.8, 0.3, 0.1))


def test_missing_hashes_are_computed(grouped: dict, tmp_path: Path) -> None:
    """A bare path,label manifest still groups exact copies (sha256 computed) and near copies (pHash)."""
    full = pd.read_csv(grouped["manifest"], dtype=str)
    bare = tmp_path / "bare.csv"
    full[["path", "label"]].to_csv(bare, index=False)
    res = split(SplitConfig(manifest=bare, out=tmp_path / "s", progress=False))
    t = load_split(tmp_path / "s").table.set_index("path")
    for paths in grouped["links"]:
        if any("copy_" in p or "reenc_" in p for p in paths):
            assert t.loc[paths, "split"].nunique() == 1
    assert res.n_images == len(full)


def test_near_duplicate_pairs_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, 300, dtype=np.uint64)
    h[10] = h[3] ^ np.uint64(0b101)  # distance 2
    h[20] = h[3] ^ np.uint64(0b111)  # distance 3
    i, j = near_duplicate_pairs(h, 2, block=64)
    assert (3, 10) in set(zip(i.tolist(), j.tolist(), strict=True))
    bits = np.array([[bin(int(a) ^ int(b)).count("1") for b in h] for a in h])
    ref = {(a, b) for a, b in zip(*np.nonzero(np.triu(bits <= 3, 1)), strict=True)}
    i3, j3 = near_duplicate_pairs(h, 3, block=64)
    assert set(zip(i3.tolist(), j3.tolist(), strict=True)) == ref
    assert largest_remainder(11, (0.8, 0.1, 0.1)) == [9, 1, 1]
    assert sum(largest_remainder(554, (0.8, 0.1, 0.1))) == 554


def test_wandb_artifact_offline(grouped: dict, tmp_path: Path) -> None:
    res = split(
        SplitConfig(manifest=grouped["manifest"], out=tmp_path / "s", per_class=20, wandb="offline", table_rows=12)
    )
    assert res.wandb_artifact == "data-xray-tiny-split"
    assert res.wandb_dir is not None
    runs = list(Path(res.wandb_dir).rglob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for r in runs for p in r.iterdir())


@pytest.mark.slow
def test_real_cxr_tiny_patients(cxr_tiny: Path, tmp_path: Path) -> None:
    """cxr-tiny (1,500 images; COVID19 has 500 images of 289 patients): no patient crosses splits, each class
    is within one image of 80/10/10."""
    src = pd.read_csv(cxr_tiny / "SOURCES.csv", dtype=str)
    rows = []
    for _, r in src.iterrows():
        p = cxr_tiny / r["file"]
        data = p.read_bytes()
        rows.append({"path": str(p), "label": r["class"], "sha256": hashlib.sha256(data).hexdigest(),
                     "patient_id": r["patient_id"]})  # fmt: skip
    man = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(man, index=False)
    res = split(SplitConfig(manifest=man, out=tmp_path / "s", progress=False))  # pHash computed from pixels
    t = load_split(tmp_path / "s").table
    assert (t.groupby("patient_id")["split"].nunique() == 1).all()
    assert (t.groupby("sha256")["split"].nunique() == 1).all()
    for c in ("COVID19", "NORMAL", "PNEUMONIA"):
        for s, f in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
            assert abs(res.counts[c][s] - 500 * f) <= 1


def test_cli_split(grouped: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cxrlab.cli import main

    out = tmp_path / "cli"
    rc = main(["data", "split", str(grouped["manifest"]), "--out", str(out), "--per-class", "20", "--no-progress"])
    assert rc == 0
    meta = json.loads((out / "split.json").read_text())
    assert meta["dataset_version"] in capsys.readouterr().out.replace("\n", "")
    assert meta["per_class"] == 20 and sum(meta["totals"].values()) == 60
    # bad input: a clear message and exit 2, no traceback
    assert main(["data", "split", str(grouped["manifest"]), "--out", str(out), "--exclude-flagged", "fuzzy"]) == 2
    assert "fuzzy" in capsys.readouterr().err
    assert main(["data", "split", str(grouped["manifest"]), "--out", str(out), "--exclude-flagged", "blur"]) == 2
    assert "--audit" in capsys.readouterr().err
    assert main(["data", "split", str(grouped["manifest"]), "--out", str(out), "--fractions", "0.8,x"]) == 2
