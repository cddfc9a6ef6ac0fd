"""Contracts of cxrlab.pipeline (`cxrlab run`): every stage's outputs, and resumability stage by stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TEST_SEED
from cxrlab.pipeline import PipelineError, RunConfig, run_pipeline

TINY_CONFIG = """\
model_name: test_efficientnet
pre_trained: false
img_size: [64, 64]
epochs: 1
batch_size: 16
evaluate: val
tracking:
  wandb: "off"
"""


def _mtimes(d: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    from cxrlab.cli import main

    base = tmp_path_factory.mktemp("pipeline")
    cfg = base / "tiny.yaml"
    cfg.write_text(TINY_CONFIG)
    out = base / "out"
    rc = main(
        ["run", "--demo", "--out", str(out), "--config", str(cfg), "--demo-n", "10", "--demo-size", "64"]
        + ["--n-boot", "100", "--no-progress", "--demo-seed", str(TEST_SEED)]
    )
    return out, cfg, rc


def _rerun(out: Path, cfg: Path, **kw: object) -> RunConfig:
    """The ``demo`` fixture's run as a RunConfig, with ``kw`` on top: the same run again."""
    return RunConfig(
        demo=True,
        out=out,
        config=cfg,
        demo_n_per_class=10,
        demo_size=64,
        demo_seed=TEST_SEED,
        n_boot=100,
        progress=False,
        **kw,
    )


@pytest.mark.slow
@pytest.mark.trains
def test_demo_pipeline_writes_every_stage(demo: tuple[Path, Path, int]) -> None:
    out, _, rc = demo
    assert rc == 0
    assert (out / "data" / "manifest.csv").is_file()
    assert (out / "split" / "split.csv").is_file() and (out / "split" / "split.json").is_file()
    doc = json.loads((out / "pipeline.json").read_text())
    run = Path(doc["run_dir"])
    assert run.parent == out / "runs"
    for f in ("summary.json", "metrics.csv", "bundle/bundle.json", "eval-test/metrics.json", "report.html"):
        assert (run / f).is_file(), f
    assert (out / "report.html").is_file()
    status = {s["name"]: s["status"] for s in doc["stages"]}
    assert all(status[s] == "done" for s in ("synth", "ingest", "split", "train", "evaluate", "report"))
    m = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert m["n"] == _n_test(out) and m["n_skipped"] == 0
    assert "test/accuracy" in doc["headline"]


def _n_test(out: Path) -> int:
    import pandas as pd

    return int((pd.read_csv(out / "split" / "split.csv")["split"] == "test").sum())


@pytest.mark.slow
@pytest.mark.trains
def test_second_run_redoes_nothing_and_force_redoes_from_a_stage(demo: tuple[Path, Path, int]) -> None:
    out, cfg, _ = demo
    before = _mtimes(out / "runs")
    res = run_pipeline(_rerun(out, cfg), log=lambda *_: None)
    names = [s.name for s in res.stages]
    assert names == ["synth", "ingest", "split", "audit", "train", "evaluate", "explain", "report"], names
    assert {s.name: s.status for s in res.stages} == dict.fromkeys(names, "skipped (up to date)")
    assert _mtimes(out / "runs") == before  # not one file rewritten
    # --force evaluate: evaluate and what follows are redone, training is not
    res = run_pipeline(_rerun(out, cfg, force=["evaluate"]), log=lambda *_: None)
    st = {s.name: s.status for s in res.stages}
    assert st["train"] == "skipped (up to date)" and st["evaluate"] == "done" and st["report"] == "done"
    after = _mtimes(out / "runs")
    ckpts = [p for p in before if "/checkpoints/" in p or p.endswith("model.safetensors")]
    assert ckpts and all(after[p] == before[p] for p in ckpts)


def test_pipeline_input_errors(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="--demo"):
        run_pipeline(RunConfig(out=tmp_path / "o"))
    with pytest.raises(PipelineError, match="does not exist"):
        run_pipeline(RunConfig(src=tmp_path / "missing", out=tmp_path / "o"))
    from cxrlab.config import ConfigError

    with pytest.raises(ConfigError, match="unknown stage"):
        from cxrlab.config import build_config

        build_config(RunConfig, {"out": tmp_path, "demo": True, "force": ["trian"]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 1\n")
    with pytest.raises(ConfigError, match="epochz"):
        run_pipeline(RunConfig(demo=True, out=tmp_path / "o", config=bad))
    assert not (tmp_path / "o").exists()  # a bad config fails before any work


@pytest.mark.slow
@pytest.mark.trains
def test_costly_class_changes_the_headline_without_retraining(demo: tuple[Path, Path, int]) -> None:
    # last in the module: it re-evaluates the demo run with another costly class
    out, cfg, _ = demo
    assert "test/recall_COVID19" in json.loads((out / "pipeline.json").read_text())["headline"]  # the default
    ckpts = {p: t for p, t in _mtimes(out / "runs").items() if "/checkpoints/" in p}
    run = _rerun(out, cfg, overrides=["costly_class=normal"])
    res = run_pipeline(run, log=lambda *_: None)
    st = {s.name: s.status for s in res.stages}
    assert st["train"] == "skipped (up to date)" and st["evaluate"] == "done"
    assert "test/recall_NORMAL" in res.headline and "test/recall_COVID19" not in res.headline
    assert json.loads((out / "pipeline.json").read_text())["headline"] == res.headline
    assert json.loads((res.run_dir / "eval-test" / "metrics.json").read_text())["costly_class"] == "NORMAL"
    assert "NORMAL recall" in (out / "report.html").read_text()
    assert all(_mtimes(out / "runs")[p] == t for p, t in ckpts.items())  # not retrained
    from cxrlab.data.classes import UnknownClassError

    with pytest.raises(UnknownClassError, match="valid: COVID19, NORMAL, PNEUMONIA"):
        run_pipeline(run.model_copy(update={"overrides": ["costly_class=NORML"]}), log=lambda *_: None)
