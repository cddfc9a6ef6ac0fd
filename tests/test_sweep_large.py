"""Larger sweeps (issue 13, part 3): the large sweep files and their CPU twin; W&B's ``early_terminate: hyperband``
as Optuna's HyperbandPruner fed per epoch by a Lightning callback (PRUNED trials in the table, CSV and plot);
an interrupted trial resumed from its own ``last.ckpt``; fANOVA parameter importances on the sweep page.

Contract tests use a fake ``train_fn`` that drives the real pruning callback with a fake trainer; the acceptance
tests (``trains``) run the real ``train()`` on the CPU twin with 64 px phantoms."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from cxrlab.config import Config
from cxrlab.runs import checkpoint_path
from cxrlab.sweep.runner import sweep
from cxrlab.sweep.spec import SweepConfig, SweepSpecError, parse_sweep_spec

REPO = Path(__file__).resolve().parents[1]
LARGE = REPO / "configs" / "sweep-large.yaml"
LARGE_CPU = REPO / "configs" / "sweep-large-cpu.yaml"
SWEPT = {"learning_rate", "batch_size", "weight_decay", "lr_scheduler", "label_smoothing"}


def _cfg(tmp_path: Path, sweep_file: Path, **kw: Any) -> SweepConfig:
    kw.setdefault("data", "unused-split")
    kw.setdefault("verbose", False)
    kw.setdefault("seed", 7)
    return SweepConfig(sweep_file=sweep_file, out=tmp_path / "sweeps", **kw)


def _write(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------- the files


@pytest.mark.parametrize("path", [LARGE, LARGE_CPU])
def test_large_sweep_files_parse_bayes_with_hyperband(path: Path) -> None:
    spec = parse_sweep_spec(path)
    assert spec.method == "bayes" and spec.run_cap and spec.metric == "val/f1_macro"
    assert {p.key for p in spec.searched} == SWEPT
    dists = {p.key: p.distribution for p in spec.searched}
    assert dists["learning_rate"] == dists["weight_decay"] == "log_uniform_values"
    assert dists["batch_size"] == dists["label_smoothing"] == "q_uniform"
    assert dists["lr_scheduler"] == "categorical"
    assert spec.early_terminate and spec.early_terminate["type"] == "hyperband"
    assert spec.early_terminate["min_iter"] >= 1 and spec.early_terminate["eta"] >= 2
    assert "early_terminate" not in spec.ignored  # used now, not ignored
    # `method: random` works with the same file
    raw = yaml.safe_load(path.read_text())
    assert parse_sweep_spec({**raw, "method": "random"}).method == "random"


def test_cpu_twin_is_cpu_sized() -> None:
    c = parse_sweep_spec(LARGE_CPU).constants
    assert c["model_name"].startswith("test_") and c["img_size"] == [64, 64] and c["epochs"] <= 4
    assert c["trainer.limit_train_batches"] <= 2


@pytest.mark.parametrize(
    ("et", "match"),
    [
        ({"type": "median", "min_iter": 1}, r"early_terminate.type must be one of hyperband, got 'median'"),
        ({"type": "hyperband", "min_iter": 0}, r"early_terminate.min_iter must be an integer >= 1"),
        ({"type": "hyperband", "min_iter": 1, "eta": 1}, r"early_terminate.eta must be an integer >= 2"),
        ({"type": "hyperband", "min_iter": 1, "etta": 2}, r"unknown key\(s\) etta; valid: type, min_iter"),
        ({"type": "hyperband"}, r"needs min_iter"),
        ("hyperband", r"must be a mapping"),
    ],
)
def test_bad_early_terminate_names_the_key(tmp_path: Path, et: Any, match: str) -> None:
    raw = {"method": "random", "parameters": {"learning_rate": {"values": [0.1]}}, "early_terminate": et}
    with pytest.raises(SweepSpecError, match=match):
        parse_sweep_spec(_write(tmp_path / "s.yaml", raw))


# ------------------------------------------------------------------------------- pruning (fake trainer)


class EpochFake:
    """A ``train_fn`` that 'trains' ``cfg.epochs`` epochs: a metric curve from the learning rate, reported through
    the callbacks the sweep passes (the real pruning callback, driven by a fake trainer), and a last.ckpt per
    epoch. ``hang_on``: the call that raises KeyboardInterrupt after ``hang_epochs`` epochs (an interruption)."""

    def __init__(self, hang_on: int | None = None, hang_epochs: int = 2):
        self.calls: list[tuple[Config, dict[str, Any]]] = []
        self.hang_on, self.hang_epochs = hang_on, hang_epochs

    def __call__(self, cfg: Config, **kw: Any) -> SimpleNamespace:
        self.calls.append((cfg, kw))
        run_dir = Path(kw.get("resume") or Path(cfg.output_dir) / cfg.run_name)
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = checkpoint_path(run_dir, "last")
        start = int(json.loads(ckpt.read_text())["epoch"]) + 1 if kw.get("resume") else 0
        value = 0.0
        for epoch in range(start, cfg.epochs):
            if len(self.calls) == self.hang_on and epoch == self.hang_epochs:
                raise KeyboardInterrupt
            value = 1.0 - abs(cfg.learning_rate - 1e-3) * 100 + 0.01 * epoch
            trainer = SimpleNamespace(
                sanity_checking=False,
                callback_metrics={"val/f1_macro": value},
                current_epoch=epoch,
                max_epochs=cfg.epochs,
            )
            for cb in kw.get("callbacks") or []:
                cb.on_validation_end(trainer, None)
            ckpt.parent.mkdir(exist_ok=True)
            ckpt.write_text(json.dumps({"epoch": epoch}))
            with (run_dir / "epochs.txt").open("a") as f:
                f.write(f"{epoch}\n")
        return SimpleNamespace(run_dir=run_dir, metrics={"val/f1_macro": value})


def _hyper_spec(tmp_path: Path, run_cap: int = 10, **et: Any) -> Path:
    return _write(
        tmp_path / "hb.yaml",
        {
            "name": "hb",
            "method": "bayes",
            "metric": {"name": "val/f1_macro", "goal": "maximize"},
            "run_cap": run_cap,
            "early_terminate": {"type": "hyperband", "min_iter": 1, "max_iter": 8, "eta": 2, **et},
            "parameters": {
                "learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
                "label_smoothing": {"distribution": "q_uniform", "min": 0.0, "max": 0.2, "q": 0.05},
                "epochs": {"value": 8},
            },
        },
    )


def test_hyperband_prunes_trials_and_shows_them(tmp_path: Path) -> None:
    fake = EpochFake()
    res = sweep(_cfg(tmp_path, _hyper_spec(tmp_path)), train_fn=fake)
    assert len(fake.calls) == 10 and all(kw.get("callbacks") for _, kw in fake.calls)
    statuses = [r["status"] for r in res.rows]
    assert statuses.count("PRUNED") >= 1 and statuses.count("COMPLETE") >= 1, statuses
    assert res.best is not None and res.best["status"] == "COMPLETE" and res.complete
    for r in res.rows:
        epochs = (Path(r["run_dir"]) / "epochs.txt").read_text().split()
        if r["status"] == "PRUNED":
            assert "pruned after epoch" in r["reason"] and len(epochs) < 8  # stopped early
            assert r["metrics"]["val/f1_macro"] is not None
        else:
            assert len(epochs) == 8
    csv_rows = _rows(res.summary_csv)
    assert [r["status"] for r in csv_rows] == statuses
    assert all(r["val/f1_macro"] != "" for r in csv_rows)  # pruned rows carry their last reported value
    page = res.plot_html.read_text() if res.plot_html else ""
    assert "PRUNED" in page and "pruned (their last reported" in page
    # importances next to the parallel coordinates
    assert res.importances and set(res.importances) == {"learning_rate", "label_smoothing"}
    assert "id='importance'" in page and "parameter importance" in page
    saved = json.loads((res.sweep_dir / "importance.json").read_text())
    assert saved["importances"] == pytest.approx(res.importances)

    again = EpochFake()
    res2 = sweep(_cfg(tmp_path, _hyper_spec(tmp_path)), train_fn=again)  # pruned trials are finished: none re-run
    assert again.calls == [] and res2.complete and [r["status"] for r in res2.rows] == statuses


def test_without_early_terminate_no_callback_is_passed(tmp_path: Path) -> None:
    spec = yaml.safe_load(_hyper_spec(tmp_path).read_text())
    del spec["early_terminate"]
    fake = EpochFake()
    res = sweep(_cfg(tmp_path, _write(tmp_path / "plain.yaml", spec), n_trials=2), train_fn=fake)
    assert [kw for _, kw in fake.calls] == [{}, {}]
    assert {r["status"] for r in res.rows} == {"COMPLETE"}


def test_importances_need_two_completed_trials(tmp_path: Path) -> None:
    spec = yaml.safe_load(_hyper_spec(tmp_path, run_cap=1).read_text())
    res = sweep(_cfg(tmp_path, _write(tmp_path / "one.yaml", spec)), train_fn=EpochFake())
    assert res.importances is None and "at least 2 completed trials (1 so far)" in res.importance_note
    assert res.plot_html and "at least 2 completed trials" in res.plot_html.read_text()


# --------------------------------------------------------------------------------------- resume (fake)


def test_interrupted_trial_resumes_from_its_last_ckpt(tmp_path: Path) -> None:
    spec = yaml.safe_load(_hyper_spec(tmp_path, run_cap=3).read_text())
    del spec["early_terminate"]
    f = _write(tmp_path / "r.yaml", spec)
    first = EpochFake(hang_on=2, hang_epochs=3)  # the second trial is interrupted after 3 of its 8 epochs
    with pytest.raises(KeyboardInterrupt):
        sweep(_cfg(tmp_path, f), train_fn=first)
    killed_cfg, _ = first.calls[1]
    killed_dir = Path(killed_cfg.output_dir) / killed_cfg.run_name

    again = EpochFake()
    res = sweep(_cfg(tmp_path, f), train_fn=again)
    resumed_cfg, kw = again.calls[0]
    assert Path(kw["resume"]) == killed_dir  # the same run directory, continued from its last.ckpt
    assert resumed_cfg.learning_rate == killed_cfg.learning_rate  # with the same parameters
    assert resumed_cfg.label_smoothing == killed_cfg.label_smoothing
    assert (killed_dir / "epochs.txt").read_text().split() == [str(e) for e in range(8)]  # each epoch once
    assert len(again.calls) == 2 and all("resume" not in kw for _, kw in again.calls[1:])
    by_status = {r["status"]: r for r in res.rows}
    assert "resumed by trial" in by_status["INTERRUPTED"]["reason"]
    done = [r for r in res.rows if r["status"] == "COMPLETE"]
    assert len(done) == 3 and res.complete
    assert any(r["run_dir"] == str(killed_dir) and "resumed trial 1" in r["reason"] for r in done)
    assert killed_dir.is_dir()  # retention does not delete the resumed trial's directory


# -------------------------------------------------------------------------------- acceptance (training)


@pytest.mark.slow
@pytest.mark.trains
def test_cpu_twin_bayes_hyperband_prunes_and_reports_best(phantom_split: Path, tmp_path: Path) -> None:
    """The CPU twin as shipped (metric val/f1_macro swapped for val/loss, which has no ties on phantoms, so the
    pruner has an order to cut on whatever the data seed)."""
    raw = yaml.safe_load(LARGE_CPU.read_text())
    raw["metric"] = {"name": "val/loss", "goal": "minimize"}
    f = _write(tmp_path / "twin.yaml", raw)
    cfg = _cfg(tmp_path, f, data=str(phantom_split), overrides=["tracking.wandb=off"])
    res = sweep(cfg)
    statuses = [r["status"] for r in res.rows]
    assert len(statuses) == raw["run_cap"] and "FAILED" not in statuses, res.rows
    assert statuses.count("PRUNED") >= 1, statuses
    assert res.best is not None and res.best["objective"] is not None
    assert "PRUNED" in {r["status"] for r in _rows(res.summary_csv)}


WORKER = textwrap.dedent(
    """
    import json, sys, threading
    from pathlib import Path
    from lightning.pytorch.callbacks import Callback
    from cxrlab.sweep.runner import sweep
    from cxrlab.sweep.spec import SweepConfig
    from cxrlab.training.train import train

    args = json.loads(sys.argv[1])

    class Hang(Callback):  # after two epochs (both checkpointed), say so and wait to be killed
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 2:
                Path(args["ready"]).write_text(str(Path(trainer.default_root_dir)))
                threading.Event().wait()

    def train_fn(cfg, **kw):
        kw["callbacks"] = [*kw.get("callbacks", []), Hang()]
        return train(cfg, **kw)

    cfg = SweepConfig(sweep_file=args["sweep"], out=args["out"], data=args["data"], verbose=False, seed=7,
                      overrides=["tracking.wandb=off"])
    sweep(cfg, train_fn=train_fn)
    """
)


@pytest.mark.trains
def test_killed_trial_resumes_from_its_checkpoint(phantom_split: Path, tmp_path: Path) -> None:
    script, ready, out = tmp_path / "worker.py", tmp_path / "ready", tmp_path / "sweeps"
    script.write_text(WORKER)
    # resume is what this test is about: without early termination, so no pruning decision (which depends on the
    # data seed) can end the resumed trial before its last epoch
    raw = yaml.safe_load(LARGE_CPU.read_text())
    raw.pop("early_terminate", None)
    spec = _write(tmp_path / "sweep-large-cpu-no-pruning.yaml", raw)
    args = {"sweep": str(spec), "out": str(out), "data": str(phantom_split), "ready": str(ready)}
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(args)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():  # the first trial (never pruned: first in its bracket) is at epoch 2
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "the worker never reached its third epoch"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    run_dir = Path(ready.read_text())
    before = (run_dir / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in before[1:]] == ["0", "1"] and checkpoint_path(run_dir, "last").is_file()

    from lightning.pytorch.callbacks import Callback

    from cxrlab.training.train import train

    seen: list[dict[str, Any]] = []
    trained: list[int] = []

    class Epochs(Callback):
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            trained.append(int(trainer.current_epoch))

    def train_fn(cfg: Config, **kw: Any) -> Any:
        seen.append(dict(kw))
        kw["callbacks"] = [*kw.get("callbacks", []), Epochs()]
        return train(cfg, **kw)

    res = sweep(
        _cfg(tmp_path, spec, data=str(phantom_split), overrides=["tracking.wandb=off"], n_trials=1),
        train_fn=train_fn,
    )
    # continued from last.ckpt (Lightning may finish the epoch that checkpoint was saved in), not from epoch 0
    assert Path(seen[0]["resume"]) == run_dir and trained and trained[0] in (1, 2) and trained[-1] == 3, trained
    after = (run_dir / "metrics.csv").read_text().splitlines()
    epochs = [int(r.split(",")[0]) for r in after[1:]]
    assert epochs == [0, 1, 2, 3]  # 2 epochs before the kill + 2 after, each once
    assert after[1] == before[1]  # the epoch before the checkpoint is kept as it was
    killed = [r for r in res.rows if r["status"] == "INTERRUPTED"]
    assert len(killed) == 1 and "died" in killed[0]["reason"] and "resumed by trial 1" in killed[0]["reason"]
    done = [r for r in res.rows if r["status"] == "COMPLETE"]
    assert len(done) == 1 and done[0]["run_dir"] == str(run_dir) and res.best is not None
