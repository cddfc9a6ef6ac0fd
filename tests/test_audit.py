"""Contracts of cxrlab.data.audit: a planted text shortcut is flagged (and an absent one is not), duplicates
across splits and unreadable files are reported, the HTML is self-contained, audit flags drive
``split --exclude-flagged``; on real cxr-tiny the confound score flags image size/aspect."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import pandas as pd
import pytest

from conftest import TEST_SEED
from cxrlab.data.audit import CONFOUND_MARGIN, FLAGS, AuditConfig, audit, confound_score
from cxrlab.data.ingest import IngestConfig, ingest
from cxrlab.data.manifest import MANIFEST_FILE
from cxrlab.data.split import SplitConfig, split
from cxrlab.data.synth import SynthConfig, generate

TEXT = "burned-in text/markers"
SIZE = "image size/aspect"


def _ingest(src: Path, out: Path) -> Path:
    ingest(IngestConfig(src=src, out=out, workers=1, progress=False))
    return out / MANIFEST_FILE


@pytest.fixture(scope="module")
def phantom_manifest(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _ingest(phantom_dir, tmp_path_factory.mktemp("phantom-ingest"))


@pytest.fixture(scope="module")
def shortcut_audit(tmp_path_factory: pytest.TempPathFactory):
    """3 x 20 phantoms of 96 px where every COVID19 image carries a text marker, ingested and audited with the
    2-process pool."""
    root = tmp_path_factory.mktemp("shortcut")
    generate(SynthConfig(out=root / "img", n_per_class=20, size=96, seed=TEST_SEED, shortcut_class="COVID19"))
    man = _ingest(root / "img", root / "ingest")
    return audit(AuditConfig(data=man, out=root / "audit", workers=2, progress=False))


@pytest.mark.trains  # the confound score is a cross-validated classifier fitted on the drawn phantoms
def test_planted_shortcut_is_flagged(shortcut_audit) -> None:
    res = shortcut_audit
    assert res.n_images == 60 and res.n_unreadable == 0
    assert res.counts == {c: {"all": 20} for c in ("COVID19", "NORMAL", "PNEUMONIA")}
    assert res.text_share["COVID19"] >= 0.9
    assert res.text_share["NORMAL"] <= 0.1 and res.text_share["PNEUMONIA"] <= 0.1
    conf = res.confound
    chance = conf["chance_balanced_accuracy"]
    assert chance == pytest.approx(1 / 3, abs=1e-3)
    text = conf["groups"][TEXT]
    assert text["balanced_accuracy"] >= chance + CONFOUND_MARGIN
    assert text["recall"]["COVID19"] >= 0.9
    # all phantoms are 96x96: size/aspect carries nothing and is not flagged
    assert conf["groups"][SIZE]["balanced_accuracy"] < chance + CONFOUND_MARGIN
    assert any(TEXT in w for w in res.warnings)
    assert not any(w.startswith(SIZE) for w in res.warnings)
    assert any("COVID19" in w and "text" in w for w in res.warnings)


def test_outputs_and_self_contained_html(shortcut_audit) -> None:
    res = shortcut_audit
    feats = pd.read_csv(res.features_path, keep_default_na=False)
    assert len(feats) == 60
    for col in ("path", "label", "split", "width", "height", "aspect", "mean", "sharpness", "text_score", "flags"):
        assert col in feats.columns
    assert all(f"flag_{f}" in feats.columns for f in FLAGS)
    marked = feats[feats["label"] == "COVID19"]
    assert (marked["flag_text"].astype(str) == "True").mean() >= 0.9
    assert marked["flags"].str.contains("text").mean() >= 0.9
    summary = json.loads(res.json_path.read_text())
    assert summary["n_images"] == 60 and summary["confound"]["groups"][TEXT]["balanced_accuracy"] > 0.5
    assert summary["warnings"] == res.warnings
    html = res.html_path.read_text()
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert len(re.findall(r"data:image/png;base64,", html)) >= 3  # bar chart, histograms, gallery
    assert html.index("Confound") < html.index("<h2>Counts</h2>")  # the warning comes first


def test_no_shortcut_no_text_warning(phantom_manifest: Path, tmp_path: Path) -> None:
    res = audit(AuditConfig(data=phantom_manifest, out=tmp_path / "audit", workers=1, progress=False))
    assert max(res.text_share.values()) == 0.0
    chance = res.confound["chance_balanced_accuracy"]
    assert res.confound["groups"][TEXT]["balanced_accuracy"] < chance + CONFOUND_MARGIN
    assert not any(TEXT in w for w in res.warnings)


def test_split_duplicates_and_unreadable(phantom_manifest: Path, tmp_path: Path) -> None:
    """A split with an exact copy in another split, a near copy and an unreadable file."""
    man = pd.read_csv(phantom_manifest, dtype=str, keep_default_na=False)
    split(SplitConfig(manifest=phantom_manifest, out=tmp_path / "split", progress=False))
    t = pd.read_csv(tmp_path / "split" / "split.csv", dtype=str, keep_default_na=False)
    extra = tmp_path / "extra"
    extra.mkdir()
    src = t[t["split"] == "train"].iloc[0]
    copy = extra / "copy.png"
    shutil.copy(src["path"], copy)
    near = extra / "near.jpg"
    g = cv2.imread(src["path"], cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(near), g, [cv2.IMWRITE_JPEG_QUALITY, 70])
    bad = extra / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    rows = []
    for p, s in ((copy, "test"), (near, "val"), (bad, "train")):
        r = src.copy()
        r["path"], r["split"], r["sha256"], r["phash"] = str(p), s, "", ""
        rows.append(r)
    t2 = pd.concat([t, pd.DataFrame(rows)], ignore_index=True)
    t2.to_csv(tmp_path / "split" / "split.csv", index=False)
    res = audit(AuditConfig(data=tmp_path / "split", out=tmp_path / "audit", workers=1, progress=False))
    assert res.n_images == len(man) + 3 and res.n_unreadable == 1
    label = src["label"]
    assert res.counts[label]["train"] == int(((t["label"] == label) & (t["split"] == "train")).sum()) + 1
    dup = pd.read_csv(res.duplicates_path, keep_default_na=False)
    exact = dup[dup["kind"] == "exact"]
    assert {src["path"], str(copy)} == set(exact[["path_a", "path_b"]].to_numpy().ravel())
    assert (exact["cross_split"].astype(str) == "True").all()
    assert str(near) in set(dup.loc[dup["kind"] == "near", ["path_a", "path_b"]].to_numpy().ravel())
    assert res.duplicates["cross_split_pairs"] >= 2
    assert any("cross splits" in w for w in res.warnings)
    assert any("could not be read" in w for w in res.warnings)
    feats = pd.read_csv(res.features_path, keep_default_na=False).set_index("path")
    assert feats.loc[str(bad), "error"] != "" and str(feats.loc[str(bad), "flag_unreadable"]) == "True"


def test_audit_flags_drive_split_exclusion(phantom_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    blurred = []
    for i, f in enumerate(sorted((data / "NORMAL").glob("*.png"))[:2]):
        g = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        out = data / "NORMAL" / f"blurred_{i}.png"
        cv2.imwrite(str(out), cv2.GaussianBlur(g, (0, 0), 8))
        blurred.append(str(out.resolve()))
    man = _ingest(data, tmp_path / "ingest")
    res = audit(AuditConfig(data=man, out=tmp_path / "audit", workers=1, progress=False))
    feats = pd.read_csv(res.features_path, keep_default_na=False)
    flagged = set(feats.loc[feats["flag_blur"].astype(str) == "True", "path"])
    assert set(blurred) <= flagged
    sres = split(
        SplitConfig(
            manifest=man, out=tmp_path / "split", exclude_flagged=("blur",), audit=tmp_path / "audit", progress=False
        )
    )
    ex = pd.read_csv(sres.excluded_path, keep_default_na=False)
    assert set(ex["path"]) == flagged and ex["reason"].str.contains("blur").all()
    kept = set(pd.read_csv(sres.split_path)["path"])
    assert not kept & flagged


def test_confound_score_skips_tiny_classes() -> None:
    feats = pd.DataFrame(
        {
            "label": ["a", "a", "b"],
            "error": [""] * 3,
            **{c: [1.0, 2.0, 3.0] for c in ("width", "height", "aspect", "mean", "std", "dark_frac", "bright_frac")},
            "sharpness": [10.0, 20.0, 30.0],
            "text_score": [0.0] * 3,
            "text_glyphs": [0] * 3,
        }
    )
    res = confound_score(feats, ["a", "b"])
    assert "skipped" in res and res["warnings"] == []


@pytest.mark.slow
def test_real_cxr_tiny_confound(cxr_tiny: Path, tmp_path: Path) -> None:
    """Every 6th image of cxr-tiny (250): image size/aspect alone identifies COVID19 (adult, many sources,
    up to 512 px) against the 224x224 Kermany NORMAL/PNEUMONIA, and COVID19 carries more text."""
    rows = []
    for label in ("COVID19", "NORMAL", "PNEUMONIA"):
        for f in sorted((cxr_tiny / label).glob("*.jpg"))[::6]:
            rows.append({"path": str(f), "label": label})
    listing = tmp_path / "subset.csv"
    pd.DataFrame(rows).to_csv(listing, index=False)
    man = _ingest(listing, tmp_path / "ingest")
    res = audit(AuditConfig(data=man, out=tmp_path / "audit", workers=2, progress=False))
    conf = res.confound
    chance = conf["chance_balanced_accuracy"]
    size = conf["groups"][SIZE]
    assert size["balanced_accuracy"] >= chance + CONFOUND_MARGIN
    assert size["recall"]["COVID19"] >= 0.9
    assert conf["all"]["balanced_accuracy"] >= 0.75
    assert any(w.startswith(SIZE) and "the model can learn the source" in w for w in res.warnings)
    summary = json.loads(res.json_path.read_text())
    pc = summary["per_class"]
    assert pc["COVID19"]["text_multi_share"] >= pc["NORMAL"]["text_multi_share"] + 0.15
    assert pc["COVID19"]["text_glyphs_mean"] >= 2 * pc["NORMAL"]["text_glyphs_mean"]
    assert sum(sum(v.values()) for v in res.counts.values()) == len(rows) == 252


def test_cli_audit(phantom_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cxrlab.cli import main

    out = tmp_path / "cli"
    rc = main(["data", "audit", str(phantom_manifest), "--out", str(out), "--workers", "1", "--no-progress"])
    assert rc == 0
    for f in ("audit.html", "audit.json", "audit_features.csv", "duplicates.csv"):
        assert (out / f).is_file(), f
    assert "confound score" in capsys.readouterr().out
    assert main(["data", "audit", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "manifest not found" in capsys.readouterr().err
