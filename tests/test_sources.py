"""Contracts of the source column: ingest (several roots, SOURCES.csv / CSV column / regex / root name), split
--holdout-source, the datamodule, the audit's source section and per-source metrics in evaluate; on phantoms,
and on the real shared folders where the issue's acceptance asks for them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

import cxrlab.cli
import cxrlab.cli.data
import cxrlab.cli.evaluate
from conftest import TEST_SEED
from cxrlab.cli import main
from cxrlab.data.ingest import IngestConfig, ingest
from cxrlab.data.manifest import DataError, load_split, read_manifest
from cxrlab.data.split import SplitConfig, split

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]


@pytest.fixture(autouse=True)
def _wide_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps at 80 columns when captured; widen so messages stay on one line."""
    for mod in (cxrlab.cli.data, cxrlab.cli.evaluate):
        monkeypatch.setattr(mod, "console", Console(width=400))
        monkeypatch.setattr(mod, "err_console", Console(stderr=True, width=400))
    monkeypatch.setattr(cxrlab.cli, "err_console", Console(stderr=True, width=400))


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two sites of phantoms (12 per class each). site-a has a SOURCES.csv: its COVID19 images come from
    collection 'x', the rest from 'y'; site-b has none (its source is its folder's name)."""
    from cxrlab.data.synth import SynthConfig, generate

    base = tmp_path_factory.mktemp("sites")
    a, b = base / "site-a", base / "site-b"
    generate(SynthConfig(out=a, n_per_class=12, size=64, seed=TEST_SEED))
    generate(SynthConfig(out=b, n_per_class=12, size=64, seed=TEST_SEED + 100))
    with open(a / "SOURCES.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "source"])
        for c in CLASSES:
            for p in sorted((a / c).iterdir()):
                w.writerow([f"{c}/{p.name}", c, "x" if c == "COVID19" else "y"])
    return {"a": a, "b": b, "base": base}


@pytest.fixture(scope="module")
def manifest(roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("m")
    ingest(IngestConfig(src=roots["a"], extra_src=(roots["b"],), out=out, workers=0, progress=False))
    return out


# ------------------------------------------------------------------------------------------------ ingest


def test_ingest_several_roots_records_a_source_per_image(manifest: Path, roots: dict[str, Path]) -> None:
    m = read_manifest(manifest)
    assert len(m) == 72 and m["source"].ne("").all()
    in_a = m["path"].str.startswith(str(roots["a"]))
    assert set(m.loc[in_a & (m["label"] == "COVID19"), "source"]) == {"x"}
    assert set(m.loc[in_a & (m["label"] != "COVID19"), "source"]) == {"y"}
    assert set(m.loc[~in_a, "source"]) == {"site-b"}
    # path-based patient ids carry the root's name: the two sites' NORMAL/NORMAL_0000 are different patients
    assert m["patient_id"].nunique() == 72
    assert m.loc[~in_a, "patient_id"].str.startswith("site-b/").all()
    doc = json.loads((manifest / "ingest.json").read_text())
    assert doc["roots"] == [str(roots["a"]), str(roots["b"])] and doc["n_sources"] == 3
    assert doc["counts_by_source"] == {
        "site-b": {"COVID19": 12, "NORMAL": 12, "PNEUMONIA": 12},
        "x": {"COVID19": 12, "NORMAL": 0, "PNEUMONIA": 0},
        "y": {"COVID19": 0, "NORMAL": 12, "PNEUMONIA": 12},
    }
    assert doc["source_from"] == {"csv": 0, "regex": 0, "name": 0, "SOURCES.csv": 36, "root": 36}


def test_source_rules_regex_names_and_csv_column(roots: dict[str, Path], tmp_path: Path) -> None:
    a, b = roots["a"], roots["b"]
    res = ingest(IngestConfig(src=a, extra_src=(b,), out=tmp_path / "r", source_regex=r"site-(\w)/(COVID|NORM)",
                              workers=0, progress=False))  # fmt: skip
    m = read_manifest(tmp_path / "r")
    assert res.source_from["regex"] == 48 and set(m["source"]) == {"a", "b", "y", "site-b"}
    assert any("--source-regex matched 48 of 72" in w for w in res.warnings)
    # a name per root beats SOURCES.csv
    ingest(IngestConfig(src=a, extra_src=(b,), out=tmp_path / "n", source_names=("A", "B"), workers=0, progress=False))
    assert set(read_manifest(tmp_path / "n")["source"]) == {"A", "B"}
    # a CSV listing's own column (here named 'site')
    listing = tmp_path / "list.csv"
    rows = [(str(p), c, f"s{i % 2}") for c in CLASSES for i, p in enumerate(sorted((b / c).iterdir()))]
    pd.DataFrame(rows, columns=["path", "label", "site"]).to_csv(listing, index=False)
    ingest(IngestConfig(src=listing, out=tmp_path / "c", source_column="site", workers=0, progress=False))
    assert sorted(read_manifest(tmp_path / "c")["source"].value_counts().to_dict().items()) == [("s0", 18), ("s1", 18)]
    with pytest.raises(DataError, match="two of the roots"):
        ingest(IngestConfig(src=a, extra_src=(roots["base"],), out=tmp_path / "o", workers=0, progress=False))
    with pytest.raises(DataError, match="one name per root"):
        ingest(IngestConfig(src=a, out=tmp_path / "o", source_names=("1", "2"), workers=0, progress=False))


def test_cli_ingests_several_roots_with_per_source_counts(
    roots: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["data", "ingest", str(roots["a"]), str(roots["b"]), "--out", str(tmp_path / "d"), "--workers", "0"]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "in 2 roots, 3 source(s)" in out and "images per source" in out
    assert "SOURCES.csv: 36, root: 36" in out


# ------------------------------------------------------------------------------------------------- split


def test_holdout_source_goes_to_external_only(manifest: Path, tmp_path: Path, capsys) -> None:
    argv = ["data", "split", str(manifest), "--out", str(tmp_path / "s"), "--holdout-source", "site-b"]
    assert main([*argv, "--fractions", "0.6,0.2,0.2", "--no-progress"]) == 0
    assert "external" in capsys.readouterr().out
    info = load_split(tmp_path / "s")
    t = info.table
    assert (t.loc[t["source"] == "site-b", "split"] == "external").all()
    assert (t.loc[t["split"] == "external", "source"] == "site-b").all() and (t["split"] == "external").sum() == 36
    meta = json.loads((tmp_path / "s" / "split.json").read_text())
    assert meta["holdout_sources"] == ["site-b"] and meta["totals"]["external"] == 36
    assert meta["counts_by_source"]["site-b"] == {"train": 0, "val": 0, "test": 0, "external": 36}
    # the datamodule accepts the external split and carries the source of every item
    from cxrlab.config import Config
    from cxrlab.data.datamodule import CXRDataModule

    dm = CXRDataModule(Config(model_name="test_efficientnet", img_size=(32, 32), data=str(tmp_path / "s")), info)
    ext = dm.dataset("external")
    assert len(ext) == 36 and set(ext.sources) == {"site-b"}
    assert set(dm.dataset("train").sources) == {"x", "y"}


def test_holdout_leaves_out_images_linked_to_the_held_out_source(manifest: Path, tmp_path: Path) -> None:
    m = read_manifest(manifest)
    # one site-a patient also has an image in site-b: it must not train a model that is tested on site-b
    a_row = m.index[(m["source"] == "y") & (m["label"] == "NORMAL")][0]
    b_row = m.index[m["source"] == "site-b"][0]
    m.loc[a_row, "patient_id"] = m.loc[b_row, "patient_id"] = "shared-patient"
    m.to_csv(tmp_path / "manifest.csv", index=False)
    res = split(SplitConfig(manifest=tmp_path, out=tmp_path / "s", holdout_sources=("site-b",), progress=False))
    t = load_split(tmp_path / "s").table
    assert m.loc[a_row, "path"] not in set(t["path"])
    assert [r for p, r in res.excluded if p == m.loc[a_row, "path"]] == [
        "shares a patient or duplicate group with an image of held-out source(s) site-b"
    ]
    with pytest.raises(DataError, match="its sources are: site-b, x, y"):
        split(SplitConfig(manifest=manifest, out=tmp_path / "u", holdout_sources=("nope",), progress=False))
    with pytest.raises(DataError, match="no image of class COVID19"):
        split(SplitConfig(manifest=manifest, out=tmp_path / "u", holdout_sources=("x", "site-b"), progress=False))
    m.drop(columns=["source"]).to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(DataError, match="records no source"):
        split(SplitConfig(manifest=tmp_path / "old.csv", out=tmp_path / "u", holdout_sources=("x",), progress=False))


# ------------------------------------------------------------------------------------------------- audit


def test_audit_measures_the_confound_by_source(manifest: Path, tmp_path: Path) -> None:
    from cxrlab.data.audit import AuditConfig, audit

    res = audit(AuditConfig(data=manifest, out=tmp_path / "a", workers=0, progress=False, gallery_per_flag=0))
    sa = res.sources
    assert sa["table"]["x"] == {"COVID19": 12, "NORMAL": 0, "PNEUMONIA": 0} and sa["n_sources"] == 3
    # COVID19 shares site-b with the other classes: no class is isolated here
    assert sa["isolated_classes"] == {}
    assert set(sa["per_source_confound"]) == {"site-b", "y"}  # the sources that hold several classes
    spc = sa["source_predicts_class"]
    assert 0.33 < spc["balanced_accuracy"] < 1 and 0 < spc["cramers_v"] < 1
    # without site-b, COVID19 comes only from x, which holds nothing else: the plain warning names it
    m = read_manifest(manifest)
    m[m["source"] != "site-b"].to_csv(tmp_path / "manifest.csv", index=False)
    res = audit(AuditConfig(data=tmp_path, out=tmp_path / "a2", workers=0, progress=False, gallery_per_flag=0))
    assert res.sources["isolated_classes"] == {"COVID19": ["x"]}
    assert res.warnings[0].startswith("COVID19 shares no source with any other class")
    assert res.sources["source_predicts_class"]["balanced_accuracy"] == pytest.approx(2 / 3, abs=1e-3)
    doc = json.loads((tmp_path / "a2" / "audit.json").read_text())
    assert doc["sources"]["isolated_classes"] == {"COVID19": ["x"]}
    html = (tmp_path / "a2" / "audit.html").read_text()
    assert "Sources" in html and "shares no source" in html


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_breaks_metrics_down_by_source(
    tiny_bundle: Path, manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cxrlab.analysis.evaluate import EvalConfig, evaluate
    from cxrlab.analysis.metrics import per_source_metrics

    split(SplitConfig(manifest=manifest, out=tmp_path / "s", holdout_sources=("site-b",), progress=False))
    e = evaluate(EvalConfig(target=tiny_bundle, data=tmp_path / "s", split="external", n_boot=50, progress=False,
                            out=tmp_path / "e", report=True))  # fmt: skip
    assert set(e.predictions["source"]) == {"site-b"} and e.prefix == "ext"
    ps = pd.read_csv(tmp_path / "e" / "per_source.csv")
    assert ps["source"].tolist() == ["site-b"] and ps["n"].sum() == 36
    doc = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert doc["per_source"][0]["n_COVID19"] == 12 and "collapse" in doc["shift"]
    e = evaluate(EvalConfig(target=tiny_bundle, data=manifest, n_boot=50, progress=False, out=tmp_path / "f"))
    assert e.per_source["source"].tolist() == ["site-b", "x", "y"]
    assert e.per_source.set_index("source").loc["x", "n_NORMAL"] == 0
    assert np.isnan(e.per_source.set_index("source").loc["x", "recall_NORMAL"])  # absent, not 0
    assert main(["evaluate", str(tiny_bundle), "--data", str(manifest), "--n-boot", "0", "--no-progress",
                 "--out", str(tmp_path / "g")]) == 0  # fmt: skip
    assert "per source" in capsys.readouterr().out
    # hand check: accuracy per source from the predictions themselves
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]]
    t = per_source_metrics(y, probs, ["p", "p", "p", "q", "q", "q"], CLASSES, n_boot=0).set_index("source")
    assert t.loc["p", "accuracy"] == pytest.approx(2 / 3) and t.loc["q", "accuracy"] == pytest.approx(2 / 3)
    assert t.loc["p", "recall_COVID19"] == 0.5 and t.loc["q", "predicted_COVID19"] == 1


def test_folder_sources(roots: dict[str, Path]) -> None:
    from cxrlab.data.sources import folder_sources

    a = sorted(str(p) for p in (roots["a"] / "COVID19").iterdir())[:2]
    b = sorted(str(p) for p in (roots["b"] / "NORMAL").iterdir())[:2]
    assert folder_sources(roots["a"], a) == ["x", "x"] and folder_sources(roots["b"], b) == ["site-b", "site-b"]


# -------------------------------------------------------------------------------------- real shared data


@pytest.fixture(scope="module")
def real(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tiny, adult = shared_data / "cxr-tiny", shared_data / "cxr-adult"
    if not (tiny.is_dir() and adult.is_dir()):
        pytest.skip("cxr-tiny and cxr-adult are needed")
    out = tmp_path_factory.mktemp("real")
    ingest(IngestConfig(src=tiny, extra_src=(adult,), out=out / "m", workers=2, progress=False))
    return {"tiny": tiny, "adult": adult, "m": out / "m", "out": out}


def _sources_csv_table(*folders: Path) -> pd.DataFrame:
    rows = pd.concat([pd.read_csv(f / "SOURCES.csv", usecols=["file", "class", "source"]) for f in folders])
    return pd.crosstab(rows["source"], rows["class"])


def test_real_ingest_of_two_folders_finds_five_sources(real: dict[str, Path]) -> None:
    doc = json.loads((real["m"] / "ingest.json").read_text())
    assert doc["n_images"] == 2948 and doc["n_sources"] == 5
    expected = _sources_csv_table(real["tiny"], real["adult"])
    got = pd.DataFrame(doc["counts_by_source"]).T.reindex(index=expected.index, columns=expected.columns)
    assert got.equals(expected.astype(got.dtypes.iloc[0]))


def test_real_holdout_hannover(real: dict[str, Path]) -> None:
    split(SplitConfig(manifest=real["m"], out=real["out"] / "s", holdout_sources=("hannover",), progress=False))
    t = load_split(real["out"] / "s").table
    assert ((t["source"] == "hannover") == (t["split"] == "external")).all()
    assert (t["split"] == "external").sum() == 85


def test_real_audit_source_table_matches_sources_csv(real: dict[str, Path]) -> None:
    from cxrlab.data.audit import AuditConfig, audit

    res = audit(AuditConfig(data=real["m"], out=real["out"] / "a", workers=2, progress=False, gallery_per_flag=0))
    expected = _sources_csv_table(real["tiny"], real["adult"])
    got = pd.DataFrame(res.sources["table"]).T.reindex(index=expected.index, columns=expected.columns)
    assert (got.to_numpy() == expected.to_numpy()).all()
    assert list(res.sources["isolated_classes"]) == ["COVID19"]
    assert res.warnings[0].startswith("COVID19 shares no source with any other class")


# ------------------------------------------------------------------------------------------------ validate


@pytest.mark.trains
def test_validate_holds_out_each_source_and_resumes(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import TEST_MODEL
    from cxrlab.analysis.validate import ValidateConfig, validate

    sets = [f"model_name={TEST_MODEL}", "pre_trained=false", "img_size=[32,32]", "batch_size=16", "epochs=1",
            "threads=1", "tracking.wandb=off", "trainer.enable_progress_bar=false"]  # fmt: skip
    groups = [["x"], ["site-b"], ["x", "site-b"]]
    cfg = ValidateConfig(manifest=manifest, out=tmp_path / "v", overrides=sets, groups=groups,
                         fractions=(0.6, 0.2, 0.2), n_boot=50, progress=False)  # fmt: skip
    res = validate(cfg, log=lambda _: None)
    status = {f["fold"]: f["status"] for f in res.folds}
    assert status == {"x": "done", "site-b": "done", "x_site-b": "skipped"}
    assert "no image of class COVID19" in next(f["reason"] for f in res.folds if f["status"] == "skipped")
    rows = res.rows.set_index("fold")
    assert list(rows.index) == ["x", "site-b", "pooled"]
    assert rows.loc["x", "external_n"] == 12 and rows.loc["site-b", "external_n"] == 36
    assert rows.loc["pooled", "external_n"] == 48
    # the fold that holds out x (COVID19 only) reports COVID19 recall on it, with its CI, and no other class
    assert 0 <= rows.loc["x", "external_recall_COVID19"] <= 1
    assert rows.loc["x", "external_recall_COVID19_lo"] <= rows.loc["x", "external_recall_COVID19_hi"]
    assert np.isnan(rows.loc["x", "external_recall_NORMAL"])
    assert {"test_accuracy", "test_f1_macro_lo", "external_accuracy_hi"} <= set(rows.columns)
    for f in ("validate.csv", "validate.json", "validate.html"):
        assert (tmp_path / "v" / f).is_file()
    # resumable: nothing is redone; a changed setting redoes the folds
    mtime = (tmp_path / "v" / "folds" / "x" / "model" / "summary.json").stat().st_mtime
    log: list[str] = []
    again = validate(cfg, log=log.append)
    assert sum("up to date" in m for m in log) == 3 and again.rows.equals(res.rows)
    assert (tmp_path / "v" / "folds" / "x" / "model" / "summary.json").stat().st_mtime == mtime
    argv = ["validate", str(manifest), "--out", str(tmp_path / "v"), "--holdout", "x", "--fractions", "0.6,0.2,0.2",
            "--n-boot", "20", "--no-progress", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "leave-source-out validation" in out and "pooled" in out
    assert (tmp_path / "v" / "folds" / "x" / "model" / "summary.json").stat().st_mtime != mtime


def test_compare_puts_sources_side_by_side(
    tiny_bundle: Path, manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    argv = ["compare", str(tiny_bundle), str(other), "--data", str(manifest), "--n-boot", "20", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    assert "accuracy per source" in capsys.readouterr().out
    doc = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert [r["source"] for r in doc["per_source"]["baseline"]] == ["site-b", "x", "y"]
    assert doc["per_source"]["baseline"] == doc["per_source"]["challenger"]  # the same weights


def test_predict_output_carries_the_source(
    tiny_bundle: Path, roots: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    argv = ["predict", str(tiny_bundle), str(roots["a"]), str(roots["b"] / "NORMAL"), "--format", "csv"]
    assert main([*argv, "--no-progress"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    by_dir = {(Path(r["path"]).parent.parent.name, Path(r["path"]).parent.name): r["source"] for r in rows}
    assert by_dir == {
        ("site-a", "COVID19"): "x",  # SOURCES.csv
        ("site-a", "NORMAL"): "y",
        ("site-a", "PNEUMONIA"): "y",
        ("site-b", "NORMAL"): "NORMAL",  # the input folder's name
    }
