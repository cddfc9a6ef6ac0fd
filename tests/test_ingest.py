"""Contracts of ingest: layouts, rejects with reasons, nothing silently dropped, patient ids, real data counts."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from cxrlab.data.ingest import IngestConfig, IngestRejectsError, ingest
from cxrlab.data.manifest import MANIFEST_COLUMNS, DataError, read_manifest

RNG = np.random.default_rng(0)


def _img(seed: int, size: int = 40) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return path


def _jpeg_bytes(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="JPEG")
    return b.getvalue()


def _run(src: Path, out: Path, **kw: object):
    return ingest(IngestConfig(src=src, out=out, progress=False, **kw))


@pytest.fixture()
def mixed(tmp_path: Path) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """The issue's mixed folder: good images of several kinds and one of each kind of bad file."""
    src = tmp_path / "mixed"
    good = {
        "gray": _png(src / "NORMAL" / "gray8.png", _img(1)),
        "gray16": _png(src / "NORMAL" / "gray16.png", (_img(2).astype(np.uint16) * 200 + 7)),
        "rgba": _png(src / "PNEUMONIA" / "rgba.png", np.dstack([_img(3)] * 3 + [np.full((40, 40), 255, np.uint8)])),
        "jpeg": src / "PNEUMONIA" / "ok.jpg",
        "dicom": src / "COVID19" / "scan.dcm",
    }
    good["jpeg"].write_bytes(_jpeg_bytes(_img(4)))
    good["dicom"].parent.mkdir()
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), good["dicom"])
    bad = {
        "corrupt": src / "COVID19" / "corrupt.jpg",
        "truncated": src / "NORMAL" / "truncated.png",
        "text": src / "PNEUMONIA" / "notes.png",
        "empty": src / "NORMAL" / "empty.jpeg",
    }
    junk = np.random.default_rng(9).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    bad["corrupt"].write_bytes(_jpeg_bytes(_img(5))[:300] + junk)
    full = io.BytesIO()
    Image.fromarray(_img(6, 64)).save(full, format="PNG")
    bad["truncated"].write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    bad["text"].write_text("not an image at all\n")
    bad["empty"].touch()
    (src / "NORMAL" / "README.md").write_text("notes about this folder\n")  # not a candidate: ignored, listed
    (src / "NORMAL" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return src, good, bad


def test_mixed_folder_acceptance(mixed: tuple[Path, dict[str, Path], dict[str, Path]], tmp_path: Path) -> None:
    src, good, bad = mixed
    res = _run(src, tmp_path / "out")
    assert res.layout == "class-folders"
    assert res.counts == {"COVID19": 1, "NORMAL": 2, "PNEUMONIA": 2}
    m = read_manifest(res.manifest_path)
    assert list(m.columns) == MANIFEST_COLUMNS
    assert sorted(m["path"]) == sorted(str(p) for p in good.values())
    row = m.set_index("path")
    assert row.loc[str(good["gray16"]), "bit_depth"] == 16 and row.loc[str(good["gray16"]), "mode"].startswith("I;16")
    assert row.loc[str(good["rgba"]), "mode"] == "RGBA"
    d = row.loc[str(good["dicom"])]
    assert (d["mode"], d["bit_depth"], d["width"], d["height"]) == ("MONOCHROME1", 15, 1841, 1955)
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in m["phash"])
    assert all(len(h) == 64 for h in m["sha256"])
    assert all(Path(p).is_absolute() for p in m["path"])

    rej = pd.read_csv(res.rejects_path, keep_default_na=False).set_index("path")
    assert sorted(rej.index) == sorted(str(p) for p in bad.values())
    assert rej.loc[str(bad["corrupt"]), "kind"] == "corrupt" and "JPEG" in rej.loc[str(bad["corrupt"]), "reason"]
    assert rej.loc[str(bad["truncated"]), "kind"] == "truncated"
    assert rej.loc[str(bad["text"]), "kind"] == "not_image" and "text" in rej.loc[str(bad["text"]), "reason"]
    assert rej.loc[str(bad["empty"]), "kind"] == "empty" and "zero-byte" in rej.loc[str(bad["empty"]), "reason"]
    assert res.n_rejected == 4 and any("4 file(s) rejected" in w for w in res.warnings)

    summary = json.loads(res.summary_path.read_text())
    ignored = {Path(i["path"]).name for i in summary["ignored"]}
    assert ignored == {"README.md", ".DS_Store"}
    # nothing silently dropped: every file under SRC is in the manifest, the rejects or the ignored list
    every = {str(p) for p in src.rglob("*") if p.is_file()}
    accounted = set(m["path"]) | set(rej.index) | {i["path"] for i in summary["ignored"]}
    assert every == accounted
    assert summary["counts"] == res.counts and summary["n_rejected"] == 4


def test_strict_raises_but_writes(mixed: tuple[Path, dict[str, Path], dict[str, Path]], tmp_path: Path) -> None:
    src, good, _ = mixed
    with pytest.raises(IngestRejectsError, match="4 file") as ei:
        _run(src, tmp_path / "out", strict=True)
    assert ei.value.result.n_images == len(good)
    assert len(read_manifest(tmp_path / "out")) == len(good)
    assert (tmp_path / "out" / "rejects.csv").is_file() and (tmp_path / "out" / "ingest.json").is_file()


def test_kaggle_layout_keeps_source_split(tmp_path: Path) -> None:
    src = tmp_path / "archive" / "Data"  # Kaggle's wrapper folder: ingest is pointed at its parent
    for split, n in (("train", 3), ("test", 2)):
        for c, label in enumerate(("COVID19", "NORMAL")):
            for i in range(n):
                _png(src / split / label / f"{label}_{split}_{i}.png", _img(100 * c + 10 * n + i))
    res = _run(tmp_path / "archive", tmp_path / "out")
    assert res.layout == "kaggle"
    assert res.counts == {"COVID19": 5, "NORMAL": 5}
    assert res.counts_by_split == {"test": {"COVID19": 2, "NORMAL": 2}, "train": {"COVID19": 3, "NORMAL": 3}}
    m = read_manifest(res.manifest_path)
    for _, r in m.iterrows():
        assert r["source_split"] == Path(r["path"]).parent.parent.name
        assert r["label"] == Path(r["path"]).parent.name


def test_csv_layout(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    a = _png(imgs / "a.png", _img(1))
    b = _png(imgs / "sub" / "b.png", _img(2))
    c = _png(tmp_path / "elsewhere" / "c.png", _img(3))
    lst = tmp_path / "lists" / "labels.csv"
    lst.parent.mkdir()
    lst.write_text(
        "path,label,patient_id\n"
        f"../imgs/a.png,NORMAL,p1\n../imgs/sub/b.png,PNEUMONIA,p1\n{c},NORMAL,\n"
        "../imgs/missing.png,NORMAL,p9\n../imgs/a.png,,p1\n"
    )
    res = _run(lst, tmp_path / "out")
    assert res.layout == "csv" and res.counts == {"NORMAL": 2, "PNEUMONIA": 1}
    m = read_manifest(res.manifest_path).set_index("path")
    assert m.loc[str(a), "patient_id"] == "p1" and m.loc[str(b), "patient_id"] == "p1"
    assert m.loc[str(c), "patient_id"] == str(c.with_suffix(""))  # empty column -> own path (outside the CSV's folder)
    rej = pd.read_csv(res.rejects_path, keep_default_na=False)
    assert len(rej) == 2
    assert set(rej["kind"]) == {"not_found", "no_label"}
    # headerless path,label in the documented order, SRC without .csv suffix given with csv=True
    raw = tmp_path / "list.txt"
    raw.write_text(f"{a},NORMAL\n{b},PNEUMONIA\n")
    res2 = _run(raw, tmp_path / "out2", csv=True)
    assert res2.counts == {"NORMAL": 1, "PNEUMONIA": 1} and res2.n_rejected == 0


def test_patient_regex_sources_csv_and_path_fallback(tmp_path: Path) -> None:
    src = tmp_path / "d"
    names = ["X_person12_bacteria_1.png", "person12_virus_2.png", "person13_bacteria_3.png", "IM-0001-0001.png"]
    for i, n in enumerate(names):
        _png(src / "PNEUMONIA" / n, _img(i))
    res = _run(src, tmp_path / "o1", patient_regex=r"(person\d+)_")
    pid = read_manifest(res.manifest_path).set_index("path")["patient_id"].rename(lambda p: Path(p).name).to_dict()
    assert pid == {names[0]: "person12", names[1]: "person12", names[2]: "person13", names[3]: "PNEUMONIA/IM-0001-0001"}
    assert res.patient_id_sources["regex"] == 3 and res.patient_id_sources["path"] == 1
    assert any("matched 3 of 4" in w for w in res.warnings)
    # a SOURCES.csv at the root (the shared data's layout: file relative to it, patient_id column)
    (src / "SOURCES.csv").write_text(
        "file,class,patient_id\n" + "".join(f"PNEUMONIA/{n},PNEUMONIA,src:{i % 2}\n" for i, n in enumerate(names))
    )
    res2 = _run(src, tmp_path / "o2")
    pid2 = read_manifest(res2.manifest_path).set_index("path")["patient_id"].rename(lambda p: Path(p).name).to_dict()
    assert pid2 == {n: f"src:{i % 2}" for i, n in enumerate(names)}
    assert res2.n_patients == 2 and res2.patient_id_sources["SOURCES.csv"] == 4
    # the explicit regex wins over SOURCES.csv where it matches
    res3 = _run(src, tmp_path / "o3", patient_regex=r"(person\d+)_")
    pid3 = read_manifest(res3.manifest_path).set_index("path")["patient_id"].rename(lambda p: Path(p).name).to_dict()
    assert pid3[names[0]] == "person12" and pid3[names[3]] == "src:1"


def test_duplicates_counted_and_label_conflicts_warned(tmp_path: Path) -> None:
    src = tmp_path / "d"
    a = _png(src / "NORMAL" / "a.png", _img(1))
    _png(src / "NORMAL" / "b.png", _img(2))
    shutil.copy(a, src / "NORMAL" / "a_copy.png")
    (src / "PNEUMONIA").mkdir()
    shutil.copy(a, src / "PNEUMONIA" / "a_again.png")
    res = _run(src, tmp_path / "out")
    assert res.n_duplicate == 1 and res.n_duplicate_files == 3
    assert any("different labels" in w for w in res.warnings)
    m = read_manifest(res.manifest_path)
    assert m.groupby("sha256").size().max() == 3  # duplicates are kept (split groups them), not dropped


def test_out_inside_src_is_not_ingested(tmp_path: Path) -> None:
    src = tmp_path / "d"
    for label in ("A", "B"):
        _png(src / label / "x.png", _img(ord(label)))
    first = _run(src, src / "_ingest")
    second = _run(src, src / "_ingest")
    assert first.counts == second.counts == {"A": 1, "B": 1}
    # same file name in two class folders: two patients, not one
    assert sorted(read_manifest(second.manifest_path)["patient_id"]) == ["A/x", "B/x"]


def test_process_pool_matches_in_process(phantom_dir: Path, tmp_path: Path) -> None:
    one = _run(phantom_dir, tmp_path / "w1", workers=1)
    two = _run(phantom_dir, tmp_path / "w2", workers=2)
    assert one.n_images == 72 and one.counts == {"COVID19": 24, "NORMAL": 24, "PNEUMONIA": 24}
    assert one.manifest_path.read_bytes() == two.manifest_path.read_bytes()  # deterministic order and content


@pytest.mark.parametrize(
    "setup,match",
    [
        ("missing", "not found"),
        ("empty", "is empty"),
        ("files_only", "holds only files"),
        ("empty_classes", "no images found"),
        ("all_bad", "were rejected"),
    ],
)
def test_unusable_sources_raise_data_error(tmp_path: Path, setup: str, match: str) -> None:
    src = tmp_path / "src"
    if setup != "missing":
        src.mkdir()
    if setup == "files_only":
        _png(src / "a.png", _img(1))
    if setup == "empty_classes":
        (src / "A").mkdir()
        (src / "B").mkdir()
    if setup == "all_bad":
        (src / "A").mkdir()
        (src / "A" / "x.png").write_text("nope")
    with pytest.raises(DataError, match=match):
        _run(src, tmp_path / "out")


def test_bad_patient_regex_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="regular expression"):
        IngestConfig(src=tmp_path, out=tmp_path / "o", patient_regex="(unclosed")


# ------------------------------------------------------------------------------------------------ real data


def test_real_cxr_tiny(cxr_tiny: Path, tmp_path: Path) -> None:
    res = _run(cxr_tiny, tmp_path / "out")
    assert res.counts == {"COVID19": 500, "NORMAL": 500, "PNEUMONIA": 500}
    assert res.n_rejected == 0 and res.n_ignored == 1  # SOURCES.csv, listed as not an image
    # patient ids come from the SOURCES.csv at the data root (file relative to it, patient_id column)
    assert res.patient_id_sources["SOURCES.csv"] == 1500
    m = read_manifest(res.manifest_path)
    sources = pd.read_csv(cxr_tiny / "SOURCES.csv", dtype=str, keep_default_na=False)
    expected = {str(cxr_tiny / f): pid for f, pid in zip(sources["file"], sources["patient_id"], strict=True)}
    assert dict(zip(m["path"], m["patient_id"], strict=True)) == expected


@pytest.mark.slow
def test_real_cxr_full(cxr_full: Path, tmp_path: Path) -> None:
    res = _run(cxr_full, tmp_path / "out", workers=2)
    assert res.counts == {"COVID19": 554, "NORMAL": 1579, "PNEUMONIA": 4245}
    assert res.n_images == 6378 and res.n_rejected == 0
