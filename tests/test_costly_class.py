"""``costly_class``: the class whose misses cost most is a config field (default COVID19, matched across spellings),
recorded with the run, and every headline follows it: evaluate, the report page, compare, sweeps, train."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import yaml

from conftest import tiny_train_sets
from cxrlab.analysis.evaluate import EvalConfig, evaluate
from cxrlab.config import Config, ConfigError, build_config, load_config
from cxrlab.data.classes import COSTLY_CLASS, UnknownClassError, costly_recall_key, resolve_costly_class

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]


def test_resolve_matches_spellings_and_names_the_valid_classes() -> None:
    assert resolve_costly_class(CLASSES) == "COVID19"
    assert resolve_costly_class(["covid-19", "normal"]) == "covid-19"
    assert resolve_costly_class(CLASSES, "normal") == "NORMAL"
    assert resolve_costly_class(["NORMAL", "PNEUMONIA"]) is None  # the default name on data without it: none
    with pytest.raises(UnknownClassError, match="'NORML' is not a class.*valid: COVID19, NORMAL, PNEUMONIA"):
        resolve_costly_class(CLASSES, "NORML")
    assert costly_recall_key(["test/recall_COVID19", "test/recall_NORMAL"], costly="Normal") == "test/recall_NORMAL"
    assert costly_recall_key(["test/recall_COVID19", "test/recall_NORMAL"]) == "test/recall_COVID19"


def test_config_field_default_and_validation() -> None:
    assert Config().costly_class == COSTLY_CLASS == "COVID19"
    assert load_config(None, ["costly_class=NORMAL"]).costly_class == "NORMAL"
    with pytest.raises(ConfigError, match="costly_class"):
        build_config(Config, {"costly_class": ""})
    assert EvalConfig(target=Path(".")).costly_class is None  # = the run's


# --------------------------------------------------------------------------------------------- evaluate


def _split(phantom_dir: Path, out: Path) -> Path:
    rows = []
    for c in CLASSES:
        for i, f in enumerate(sorted((phantom_dir / c).glob("*.png"))[:8]):
            s = "test" if i < 4 else "val"
            rows.append({"path": str(f.resolve()), "label": c, "patient_id": f.stem, "split": s, "group": f.stem})
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "split.csv", index=False)
    (out / "split.json").write_text(json.dumps({"dataset_version": "phantom-test-v0", "classes": CLASSES}))
    return out


def _run(tmp: Path, bundle: Path, split_dir: Path, costly: str | None = None) -> Path:
    run = tmp / "run"
    shutil.copytree(bundle, run / "bundle")
    if costly is not None:  # as train records it: in the bundle's config
        meta_path = run / "bundle" / "bundle.json"
        meta = json.loads(meta_path.read_text())
        meta["config"] = {**(meta.get("config") or {}), "costly_class": costly}
        meta_path.write_text(json.dumps(meta))
    (run / "summary.json").write_text(json.dumps({"run_id": "run", "data": str(split_dir), "best_epoch": 0}))
    return run


@pytest.fixture(scope="module")
def split_dir(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _split(phantom_dir, tmp_path_factory.mktemp("split"))


def test_evaluate_headline_follows_costly_class(tiny_bundle: Path, split_dir: Path, tmp_path: Path, capsys) -> None:
    from cxrlab.cli import main

    run = _run(tmp_path, tiny_bundle, split_dir)
    default = evaluate(EvalConfig(target=run, out=tmp_path / "d", n_boot=0, progress=False, wandb="off"))
    assert default.costly_class == "COVID19"
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["costly_class"] == "COVID19"
    assert "COVID19 recall" in (tmp_path / "d" / "report.html").read_text()

    res = evaluate(
        EvalConfig(target=run, out=tmp_path / "n", n_boot=0, progress=False, wandb="off", costly_class="normal")
    )
    assert res.costly_class == "NORMAL"
    doc = json.loads((tmp_path / "n" / "metrics.json").read_text())
    assert doc["costly_class"] == "NORMAL" and "test/recall_NORMAL" in doc["metrics"]
    html = (tmp_path / "n" / "report.html").read_text()
    assert "NORMAL recall" in html and "COVID19 recall" not in html

    args = ["evaluate", str(run), "--out", str(tmp_path / "c"), "--n-boot", "0", "--no-progress", "--wandb", "off"]
    assert main([*args, "--costly-class", "NORMAL"]) == 0
    assert "test/recall_NORMAL (costly class)" in capsys.readouterr().out
    assert main([*args, "--costly-class", "NORML"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'NORML' is not a class" in err and "valid: COVID19, NORMAL, PNEUMONIA" in err


def test_evaluate_takes_the_runs_costly_class(tiny_bundle: Path, split_dir: Path, tmp_path: Path) -> None:
    run = _run(tmp_path, tiny_bundle, split_dir, costly="PNEUMONIA")
    res = evaluate(EvalConfig(target=run, out=tmp_path / "e", n_boot=0, progress=False, wandb="off", report=False))
    assert res.costly_class == "PNEUMONIA"
    asked = evaluate(
        EvalConfig(target=run, out=tmp_path / "f", n_boot=0, progress=False, report=False, costly_class="NORMAL")
    )
    assert asked.costly_class == "NORMAL"  # the one asked for wins over the run's


def test_compare_puts_the_costly_class_first(tiny_bundle: Path, split_dir: Path, tmp_path: Path) -> None:
    from cxrlab.analysis.compare import CompareConfig, compare

    run = _run(tmp_path, tiny_bundle, split_dir)
    r = compare(
        CompareConfig(
            baseline=run, challenger=run, out=tmp_path / "cmp", n_boot=0, progress=False, costly_class="PNEUMONIA"
        )
    )
    assert r.errors["class"].iloc[0] == "PNEUMONIA" and r.baseline.costly_class == "PNEUMONIA"
    assert "False negatives of PNEUMONIA first" in (tmp_path / "cmp" / "compare.html").read_text()


# --------------------------------------------------------------------------------------------- train


def _sets(split: Path, out: Path, *extra: str) -> list[str]:
    one_batch = ("trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")
    return tiny_train_sets(split, out, "epochs=1", *one_batch, "shift_stats=false", *extra)


def test_train_refuses_an_unknown_costly_class_before_any_work(phantom_split: Path, tmp_path: Path, capsys) -> None:
    from cxrlab.cli import main

    out = tmp_path / "runs"
    assert main(["train", "--set", *_sets(phantom_split, out, "costly_class=NORML")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'NORML' is not a class" in err and "NORMAL" in err
    assert not out.exists()


@pytest.mark.trains
def test_train_records_the_costly_class_as_the_data_spells_it(phantom_split: Path, tmp_path: Path) -> None:
    from cxrlab.training.train import train

    r = train(load_config(None, _sets(phantom_split, tmp_path / "runs", "costly_class=normal")))
    assert yaml.safe_load((r.run_dir / "config.yaml").read_text())["costly_class"] == "NORMAL"
    assert json.loads((r.bundle_dir / "bundle.json").read_text())["config"]["costly_class"] == "NORMAL"


# --------------------------------------------------------------------------------------------- sweep


def test_sweep_outputs_show_the_base_configs_costly_recall(tmp_path: Path) -> None:
    from rich.console import Console

    from cxrlab.sweep.outputs import summary_table
    from cxrlab.sweep.runner import sweep
    from cxrlab.sweep.spec import SweepConfig

    def fake(cfg: Config) -> Any:
        run_dir = Path(cfg.output_dir) / cfg.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        acc = {"AdamW": 0.8, "SGD": 0.7}[cfg.optimizer]
        metrics = {"val/f1_macro": acc, "test/recall_COVID19": 0.5, "test/recall_NORMAL": acc - 0.1}
        return SimpleNamespace(run_dir=run_dir, run_id=cfg.run_name, metrics=metrics, best_epoch=0)

    spec = {
        "method": "grid",
        "metric": {"name": "val/f1_macro", "goal": "maximize"},
        "parameters": {"optimizer": {"values": ["AdamW", "SGD"]}},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    cfg = SweepConfig(
        sweep_file=tmp_path / "s.yaml",
        out=tmp_path / "sweeps",
        data="unused",
        verbose=False,
        overrides=["costly_class=NORMAL", "tracking.wandb=off"],
    )
    res = sweep(cfg, train_fn=fake)
    assert res.costly_class == "NORMAL"
    console = Console(width=200, record=True)
    console.print(summary_table(res))
    text = console.export_text()
    assert "test/recall_NORMAL" in text and "test/recall_COVID19" not in text
    labels = [json.loads(f'"{x}"') for x in re.findall(r'"label":"([^"]*)"', res.plot_html.read_text())]
    assert "test/recall_NORMAL" in labels and "test/recall_COVID19" not in labels
