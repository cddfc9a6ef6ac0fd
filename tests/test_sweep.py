"""Sweep contracts: W&B sweep YAML -> search space; Optuna grid/random/bayes studies; resume after Ctrl-C or a
killed worker; two workers splitting one grid; failed trials recorded with their reason; summary table + plot.

Most tests inject a fake ``train_fn`` (instant, deterministic); the end-to-end tests use the real ``train()``."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from cxrlab.config import Config
from cxrlab.sweep.outputs import summary_table
from cxrlab.sweep.runner import sweep
from cxrlab.sweep.spec import (
    SweepConfig,
    SweepError,
    SweepSpecError,
    check_param_keys,
    config_keys,
    flatten_params,
    parse_sweep_spec,
)

REPO = Path(__file__).resolve().parents[1]
SEED_SWEEP = REPO / "configs" / "sweep.yaml"
CPU_SWEEP = REPO / "configs" / "sweep-cpu.yaml"
SEED_POINTS = {
    (m, o) for m in ("tf_efficientnetv2_b3", "efficientnetv2_s") for o in ("AdamW", "RAdam")
}  # the seed's 2 x 2 grid
FIRST_POINT = ("tf_efficientnetv2_b3", "AdamW")  # first in the grid's fixed order


class FakeTrain:
    """Deterministic stand-in for ``cxrlab.training.train.train``: records each Config, returns metrics from it."""

    def __init__(
        self,
        fail: dict[str, Any] | None = None,
        interrupt_on: int | None = None,
        interrupt: type[BaseException] = KeyboardInterrupt,
    ):
        self.calls: list[Config] = []
        self.fail = fail or {}
        self.interrupt_on, self.interrupt = interrupt_on, interrupt

    def __call__(self, cfg: Config) -> SimpleNamespace:
        self.calls.append(cfg)
        if self.interrupt_on is not None and len(self.calls) == self.interrupt_on:
            raise self.interrupt(1) if self.interrupt is SystemExit else self.interrupt()
        run_dir = Path(cfg.output_dir) / cfg.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.model_name in self.fail:
            raise self.fail[cfg.model_name]
        acc = {"AdamW": 0.80, "RAdam": 0.90, "SGD": 0.5}.get(cfg.optimizer, 0.6)
        acc += 0.05 if cfg.model_name == "efficientnetv2_s" else 0.0
        if cfg.model_name == "diverges":
            acc = float("nan")
        metrics = {
            "val/accuracy": acc,
            "val/f1_macro": acc - 0.1,
            "test/accuracy": acc - 0.02,
            "test/f1_macro": acc - 0.03,
            "test/recall_COVID19": acc - 0.05,
        }
        return SimpleNamespace(run_dir=run_dir, run_id=cfg.run_name, metrics=metrics, best_epoch=0)


def _cfg(tmp_path: Path, sweep_file: Path, **kw: Any) -> SweepConfig:
    kw.setdefault("data", "unused-split")
    kw.setdefault("verbose", False)
    return SweepConfig(sweep_file=sweep_file, out=tmp_path / "sweeps", **kw)


def _write(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _points(rows: list[dict[str, Any]], status: str = "COMPLETE") -> list[tuple[str, str]]:
    return [(r["params"]["model_name"], r["params"]["optimizer"]) for r in rows if r["status"] == status]


# ------------------------------------------------------------------------------------------- parsing


def test_parse_every_parameter_form(tmp_path: Path) -> None:
    spec = parse_sweep_spec(
        _write(
            tmp_path / "s.yaml",
            {
                "program": "train.py",
                "method": "random",
                "metric": {"name": "val/accuracy", "goal": "maximize"},
                "run_cap": 5,
                "parameters": {
                    "model_name": {"values": ["a", "b"]},
                    "epochs": {"value": 3},
                    "learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
                    "batch_size": {"distribution": "int_uniform", "min": 8, "max": 32},
                    "label_smoothing": {"min": 0.0, "max": 0.2},  # inferred: uniform
                    "momentum": {"distribution": "q_uniform", "min": 0.8, "max": 0.95, "q": 0.05},
                    "weight_decay": {"distribution": "log_uniform", "min": -12, "max": -6},
                    "seed": {"min": 1, "max": 3},  # inferred: int_uniform
                    "augment": {"parameters": {"hflip_p": {"values": [0.0, 0.5]}, "rotate_limit": {"value": 5}}},
                    "trainer.limit_train_batches": {"value": 2},
                    "img_size": {"values": [[64, 64], [96, 96]]},
                    "scheduler.gamma": {"distribution": "normal", "mu": 0.5, "sigma": 0.1},
                },
            },
        )
    )
    p = {x.key: x for x in spec.params}
    assert (spec.method, spec.metric, spec.goal, spec.run_cap) == ("random", "val/accuracy", "maximize", 5)
    assert spec.ignored == ("program",)
    assert p["model_name"].distribution == "categorical" and p["model_name"].values == ("a", "b")
    assert p["learning_rate"].distribution == "log_uniform_values" and (
        p["learning_rate"].min,
        p["learning_rate"].max,
    ) == (1e-4, 1e-2)
    assert p["batch_size"].distribution == "int_uniform" and (p["batch_size"].min, p["batch_size"].max) == (8, 32)
    assert p["label_smoothing"].distribution == "uniform"
    assert p["seed"].distribution == "int_uniform"
    assert p["momentum"].distribution == "q_uniform" and p["momentum"].q == 0.05
    assert p["scheduler.gamma"].distribution == "normal" and p["scheduler.gamma"].mu == 0.5
    assert p["augment.hflip_p"].values == (0.0, 0.5)  # W&B's nested form -> dotted Config key
    assert spec.constants == {"epochs": 3, "augment.rotate_limit": 5, "trainer.limit_train_batches": 2}
    check_param_keys([x.key for x in spec.params])  # all real Config keys
    assert p["momentum"].grid_values() == [0.8, 0.85, 0.9, 0.95]
    assert p["seed"].grid_values() == [1, 2, 3]
    with pytest.raises(SweepSpecError, match="learning_rate.*log_uniform_values"):
        p["learning_rate"].grid_values()


def test_seed_sweep_files_parse_to_the_2x2_grid() -> None:
    for f in (SEED_SWEEP, CPU_SWEEP):
        spec = parse_sweep_spec(f)
        assert (spec.method, spec.metric, spec.goal) == ("grid", "val/accuracy", "maximize")
        assert [p.key for p in spec.searched] == ["model_name", "optimizer"]
        grid = spec.grid()
        assert len(grid) == 4 and {(g["model_name"], g["optimizer"]) for g in grid} == SEED_POINTS
    # fixed order: parameter names sorted, product of their values in YAML order
    assert parse_sweep_spec(SEED_SWEEP).grid()[:2] == [
        {"model_name": "tf_efficientnetv2_b3", "optimizer": "AdamW"},
        {"model_name": "tf_efficientnetv2_b3", "optimizer": "RAdam"},
    ]
    cpu = parse_sweep_spec(CPU_SWEEP).constants
    assert cpu["trainer.limit_train_batches"] == 2 and cpu["img_size"] == [64, 64] and cpu["epochs"] == 1


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"method": "grid", "parameters": {"lr": {"values": [1]}}}, r"'lr'.*valid keys: .*learning_rate"),
        ({"method": "grid", "parameters": {"augment": {"parameters": {"hflip": {"values": [0]}}}}}, "augment.hflip_p"),
        ({"method": "grid", "paramters": {}}, "unknown sweep key.*paramters"),
        ({"method": "hyperband", "parameters": {"epochs": {"value": 1}}}, "method"),
        ({"method": "grid", "parameters": {"learning_rate": {"min": 0.1, "max": 0.2}}}, "grid search needs discrete"),
        ({"method": "grid", "parameters": {"epochs": {"values": []}}}, "non-empty list"),
        ({"method": "grid", "parameters": {"epochs": {"distribution": "zipf", "min": 1, "max": 2}}}, "unknown distr"),
        ({"method": "grid", "parameters": {"epochs": {"valus": [1]}}}, "unknown key.*valus"),
        ({"method": "grid", "parameters": {"run_name": {"values": ["a"]}}}, "set by the sweep"),
        ({"method": "random", "parameters": {"learning_rate": {"min": 0.2, "max": 0.1}}}, "must not exceed"),
    ],
)
def test_bad_sweep_files_name_the_problem(tmp_path: Path, spec: dict[str, Any], match: str) -> None:
    f = _write(tmp_path / "bad.yaml", spec)
    with pytest.raises(SweepSpecError, match=match):
        sweep(_cfg(tmp_path, f), train_fn=FakeTrain())


def test_config_keys_and_flatten() -> None:
    keys = config_keys()
    assert {"model_name", "optimizer", "augment", "augment.hflip_p", "trainer.limit_train_batches"} <= set(keys)
    nested = {"augment": {"hflip_p": 0.5}, "img_size": [64, 64], "model_name": "m"}
    assert flatten_params(nested) == {"augment.hflip_p": 0.5, "img_size": [64, 64], "model_name": "m"}
    assert flatten_params({"augment": {"p": 1}}, keys={"augment"}) == {"augment": {"p": 1}}


# ---------------------------------------------------------------------------------------- grid sweeps


def test_grid_2x2_runs_four_trials_table_and_plot(tmp_path: Path) -> None:
    fake = FakeTrain()
    cfg = _cfg(tmp_path, SEED_SWEEP, overrides=["epochs=2", "tracking.wandb=off"])
    res = sweep(cfg, train_fn=fake)

    assert len(fake.calls) == 4
    assert {(c.model_name, c.optimizer) for c in fake.calls} == SEED_POINTS
    c0 = fake.calls[0]
    assert c0.run_name == "cxr-sweep-t000" and Path(c0.output_dir) == tmp_path / "sweeps" / "cxr-sweep" / "runs"
    assert c0.tracking.group == "cxr-sweep" and c0.epochs == 2 and c0.data == "unused-split"
    assert c0.evaluate == "test"  # so the table has test metrics

    assert [r["status"] for r in res.rows] == ["COMPLETE"] * 4 and sorted(_points(res.rows)) == sorted(SEED_POINTS)
    assert res.best is not None and res.best["params"] == {"model_name": "efficientnetv2_s", "optimizer": "RAdam"}
    assert res.best["objective"] == pytest.approx(0.95) and res.complete and res.ran_here == [0, 1, 2, 3]
    assert res.failed == []

    lines = res.summary_csv.read_text().splitlines()
    header = lines[0].split(",")
    assert header[:4] == ["trial", "status", "model_name", "optimizer"]
    assert {"val/accuracy", "val/f1_macro", "test/accuracy", "test/recall_COVID19", "reason", "run_dir"} <= set(header)
    assert len(lines) == 5

    html = res.plot_html.read_text()
    labels = [json.loads(f'"{x}"') for x in re.findall(r'"label":"([^"]*)"', html)]
    assert labels == ["model_name", "optimizer", "val/accuracy", "test/f1_macro", "test/recall_COVID19"]
    assert '"type":"parcoords"' in html and '"ticktext":["tf_efficientnetv2_b3","efficientnetv2_s"]' in html
    assert 'src="https://cdn.plot.ly' not in html and len(html) > 1_000_000  # plotly.js inlined: opens offline
    assert json.loads((res.sweep_dir / "best.json").read_text())["trial"] == 3

    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(summary_table(res))
    text = console.export_text()
    assert "test/recall_COVID19" in text and "3 *" in text

    again = sweep(cfg, train_fn=fake)  # the same command again: nothing left to run
    assert len(fake.calls) == 4 and again.ran_here == [] and len(again.rows) == 4


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupted_sweep_resumes_only_missing_points(tmp_path: Path, interrupt: type[BaseException]) -> None:
    """Ctrl-C during the second trial (Lightning turns it into SystemExit(1) inside fit), then the same sweep."""
    cfg = _cfg(tmp_path, SEED_SWEEP)
    first = FakeTrain(interrupt_on=2, interrupt=interrupt)
    with pytest.raises(interrupt):
        sweep(cfg, train_fn=first)
    csv_rows = (tmp_path / "sweeps" / "cxr-sweep" / "summary.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in csv_rows[1:]] == ["COMPLETE", "INTERRUPTED"]  # summary written on Ctrl-C

    second = FakeTrain()
    res = sweep(cfg, train_fn=second)
    done_first = (first.calls[0].model_name, first.calls[0].optimizer)
    assert len(second.calls) == 3
    assert {(c.model_name, c.optimizer) for c in second.calls} == SEED_POINTS - {done_first}
    assert sorted(_points(res.rows)) == sorted(SEED_POINTS)  # each point completed exactly once
    assert res.complete and res.failed == []


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    import torch

    f = _write(
        tmp_path / "s.yaml",
        {
            "name": "fails",
            "method": "grid",
            "metric": {"name": "val/accuracy", "goal": "maximize"},
            "parameters": {
                "model_name": {"values": ["no_such_model", "oom_model", "diverges", "efficientnetv2_s"]},
                "optimizer": {"values": ["AdamW", "Adam"]},  # "Adam" is not a valid Config optimizer
            },
        },
    )
    fake = FakeTrain(
        fail={
            "no_such_model": RuntimeError("Unknown model (no_such_model)"),
            "oom_model": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        }
    )
    res = sweep(_cfg(tmp_path, f), train_fn=fake)
    by = {(r["params"]["model_name"], r["params"]["optimizer"]): r for r in res.rows}
    assert len(res.rows) == 8 and len(fake.calls) == 4  # the 4 "Adam" configs fail validation before train
    assert by[("efficientnetv2_s", "AdamW")]["status"] == "COMPLETE"
    assert res.best is not None and res.best["params"]["model_name"] == "efficientnetv2_s"
    assert "Unknown model (no_such_model)" in by[("no_such_model", "AdamW")]["reason"]
    assert by[("oom_model", "AdamW")]["reason"].startswith("out of memory")
    assert "NaN" in by[("diverges", "AdamW")]["reason"] or "nan" in by[("diverges", "AdamW")]["reason"]
    assert (
        "optimizer" in by[("efficientnetv2_s", "Adam")]["reason"]
        and "RAdam" in by[("efficientnetv2_s", "Adam")]["reason"]
    )
    assert {r["trial"] for r in res.failed} == {r["trial"] for r in res.rows if r["status"] == "FAILED"}
    assert len(res.failed) == 7
    assert (res.sweep_dir / "logs" / f"fails-t{by[('no_such_model', 'AdamW')]['trial']:03d}.txt").is_file()
    assert "FAILED" in res.summary_csv.read_text()

    rerun = FakeTrain()
    sweep(_cfg(tmp_path, f), train_fn=rerun)
    assert rerun.calls == []  # hard failures are not re-run by default ...
    retry = FakeTrain()
    res2 = sweep(_cfg(tmp_path, f, retry_failed=True), train_fn=retry)
    assert len(retry.calls) == 3  # ... but once with --retry-failed (now no OOM / unknown model; NaN again)
    adam = {(m, "Adam") for m in ("no_such_model", "oom_model", "diverges", "efficientnetv2_s")}
    assert set(_points(res2.failed, "FAILED")) == {("diverges", "AdamW")} | adam


def test_random_and_bayes_sample_the_declared_space(tmp_path: Path) -> None:
    space = {
        "learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "batch_size": {"distribution": "int_uniform", "min": 8, "max": 32},
        "momentum": {"distribution": "q_uniform", "min": 0.8, "max": 0.95, "q": 0.05},
        "optimizer": {"values": ["AdamW", "RAdam"]},
        "augment": {"parameters": {"hflip_p": {"values": [0.0, 0.5], "probabilities": [0.0, 1.0]}}},
    }
    for method in ("random", "bayes"):
        f = _write(
            tmp_path / f"{method}.yaml", {"method": method, "metric": {"name": "val/accuracy"}, "parameters": space}
        )
        fake = FakeTrain()
        res = sweep(_cfg(tmp_path, f, n_trials=4), train_fn=fake)
        assert res.goal == "minimize"  # W&B's default goal
        assert len(fake.calls) == 4 and all(r["status"] == "COMPLETE" for r in res.rows)
        for c in fake.calls:
            assert 1e-4 <= c.learning_rate <= 1e-2 and 8 <= c.batch_size <= 32
            assert any(math.isclose(c.momentum, m) for m in (0.8, 0.85, 0.9, 0.95))
            assert c.augment.hflip_p == 0.5  # probabilities honoured
        assert len({c.learning_rate for c in fake.calls}) == 4
        again = FakeTrain()
        sweep(_cfg(tmp_path, f, n_trials=4), train_fn=again)
        assert again.calls == []  # the sweep already has its 4 trials
    f = _write(tmp_path / "nosize.yaml", {"method": "random", "parameters": space})
    with pytest.raises(SweepError, match="run_cap.*--n-trials"):
        sweep(_cfg(tmp_path, f), train_fn=FakeTrain())


def test_changed_spec_or_conflicting_override_is_refused(tmp_path: Path) -> None:
    sweep(_cfg(tmp_path, SEED_SWEEP, n_trials=1), train_fn=FakeTrain())
    spec = yaml.safe_load(SEED_SWEEP.read_text())
    spec["parameters"]["optimizer"]["values"] = ["SGD"]
    f = _write(tmp_path / "sweep.yaml", spec)  # same name "cxr-sweep", other parameters
    with pytest.raises(SweepError, match="different sweep spec"):
        sweep(_cfg(tmp_path, f), train_fn=FakeTrain())
    with pytest.raises(SweepError, match="conflicts with the sweep parameter 'optimizer'"):
        sweep(_cfg(tmp_path, SEED_SWEEP, overrides=["optimizer=SGD"]), train_fn=FakeTrain())
    with pytest.raises(SweepError, match="--data"):
        sweep(_cfg(tmp_path, SEED_SWEEP, data=None), train_fn=FakeTrain())


def test_wandb_backend_offline_says_to_use_optuna(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match="need a W&B server.*optuna"):
        sweep(_cfg(tmp_path, SEED_SWEEP, backend="wandb"), train_fn=FakeTrain())


def test_wandb_backend_online_runs_the_agent_with_the_same_trial_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No W&B server here: wandb.sweep/agent/init are stand-ins that behave like the real agent (it starts a run
    whose config holds the sampled parameters, nested for W&B's nested form) to check our side of the contract."""
    import wandb

    import cxrlab.tracking

    registered: list[dict[str, Any]] = []
    grid = [
        {"model_name": "efficientnetv2_s", "optimizer": "RAdam", "augment": {"hflip_p": 0.0}},
        {"model_name": "tf_efficientnetv2_b3", "optimizer": "AdamW", "augment": {"hflip_p": 0.5}},
    ]

    class Run:
        def __init__(self, config: dict[str, Any]) -> None:
            self.config, self.id, self.summary = config, f"r{len(registered)}", {}

        def __enter__(self) -> Run:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    def agent(sweep_id: str, function: Any, count: int | None = None, **kw: Any) -> None:
        assert sweep_id == "sid-1"
        for point in grid[:count]:
            monkeypatch.setattr(wandb, "init", lambda p=point, **kw: Run(p))
            function()

    monkeypatch.setattr(cxrlab.tracking, "resolve_wandb_mode", lambda setting: "online")
    monkeypatch.setattr(wandb, "sweep", lambda sweep, **kw: registered.append(sweep) or "sid-1")
    monkeypatch.setattr(wandb, "agent", agent)
    spec = yaml.safe_load(SEED_SWEEP.read_text())
    spec["parameters"]["augment"] = {"parameters": {"hflip_p": {"values": [0.0, 0.5]}}}
    f = _write(tmp_path / "w.yaml", spec)
    fake = FakeTrain()
    res = sweep(_cfg(tmp_path, f, backend="wandb", n_trials=2), train_fn=fake)

    assert registered == [spec]  # the YAML goes to W&B as written
    assert [(c.model_name, c.optimizer, c.augment.hflip_p) for c in fake.calls] == [
        ("efficientnetv2_s", "RAdam", 0.0),
        ("tf_efficientnetv2_b3", "AdamW", 0.5),
    ]
    assert fake.calls[0].tracking.group == "cxr-sweep" and fake.calls[0].run_name == "cxr-sweep-t000-r1"
    assert res.best is not None and res.best["params"]["model_name"] == "efficientnetv2_s"
    assert len(res.summary_csv.read_text().splitlines()) == 3 and res.plot_html.is_file()


def test_cli_reports_bad_parameter_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cxrlab.cli import main

    f = _write(tmp_path / "s.yaml", {"method": "grid", "parameters": {"modle_name": {"values": ["a"]}}})
    rc = main(["sweep", str(f), "--data", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "modle_name" in err and "model_name" in err and "Traceback" not in err


# --------------------------------------------------------------------------------- worker processes

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from types import SimpleNamespace
    from cxrlab.sweep.runner import sweep
    from cxrlab.sweep.spec import SweepConfig

    args = json.loads(sys.argv[1])
    log, ready = Path(args["log"]), Path(args["ready"])
    ready.mkdir(exist_ok=True)

    def train(cfg):
        n_done = sum(1 for _ in open(log)) if log.exists() else 0
        with open(log, "a") as f:  # O_APPEND: lines from both workers never interleave
            f.write(f"{cfg.model_name},{cfg.optimizer},{os.getpid()}\\n")
        # barrier: a worker's first trial ends only once every worker is inside a trial of its own (has claimed a
        # point), so each does part of the grid however slowly the other one starts
        (ready / str(os.getpid())).touch()
        deadline = time.time() + 120
        while len(list(ready.iterdir())) < args["workers"] and time.time() < deadline:
            time.sleep(0.05)
        if args.get("hang_after") is not None and n_done >= args["hang_after"]:
            time.sleep(600)  # stands still until killed
        time.sleep(args.get("sleep", 0.3))
        run_dir = Path(cfg.output_dir) / cfg.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        acc = 0.9 if cfg.optimizer == "RAdam" else 0.8
        return SimpleNamespace(run_dir=run_dir, metrics={"val/accuracy": acc})

    # a long grace period: a worker starved of CPU for a few seconds must not look dead to the other one (a dead
    # worker on this machine is found by its pid at once, whatever the grace period)
    cfg = SweepConfig(sweep_file=args["sweep"], out=args["out"], data="x", storage=args.get("storage"),
                      name=args.get("name"), verbose=False, heartbeat_s=1, grace_s=300)
    sweep(cfg, train_fn=train)
    """
)


def _spawn(tmp_path: Path, **args: Any) -> subprocess.Popen[bytes]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, str(script), json.dumps(args)], env=env, stderr=subprocess.PIPE)


def run_two_workers(tmp_path: Path, storage: str | None = None, name: str | None = None) -> list[list[str]]:
    """Two worker processes on one study split the seed's 4-point grid; returns the training calls made."""
    log = tmp_path / "calls.txt"
    common = {"log": str(log), "ready": str(tmp_path / "ready"), "workers": 2, "sweep": str(SEED_SWEEP)}
    common |= {"out": str(tmp_path / "sweeps"), "storage": storage, "name": name}
    procs = [_spawn(tmp_path, **common) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-3000:]
    return [line.split(",") for line in log.read_text().splitlines()]


def assert_split_without_duplicates(calls: list[list[str]]) -> None:
    points = [(m, o) for m, o, _ in calls]
    assert len(points) == 4 and set(points) == SEED_POINTS, points  # every point once, none twice
    assert len({pid for _, _, pid in calls}) == 2, calls  # both workers did part of the grid


def test_two_workers_split_a_grid_on_sqlite(tmp_path: Path) -> None:
    calls = run_two_workers(tmp_path)
    assert_split_without_duplicates(calls)
    res = sweep(_cfg(tmp_path, SEED_SWEEP), train_fn=FakeTrain())  # a third look: nothing left
    assert res.ran_here == [] and sorted(_points(res.rows)) == sorted(SEED_POINTS) and res.complete


def test_killed_worker_is_resumed_by_the_same_command(tmp_path: Path) -> None:
    log = tmp_path / "calls.txt"
    args = {"log": str(log), "ready": str(tmp_path / "ready"), "workers": 1, "sweep": str(SEED_SWEEP)}
    args |= {"out": str(tmp_path / "sweeps"), "hang_after": 1}  # trial 1 hangs: killed mid-trial
    proc = _spawn(tmp_path, **args)
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "worker did not start its second trial"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    first = tuple(log.read_text().splitlines()[0].split(",")[:2])

    fake = FakeTrain()
    res = sweep(_cfg(tmp_path, SEED_SWEEP), train_fn=fake)  # the same sweep again, right after the kill
    assert len(fake.calls) == 3
    assert {(c.model_name, c.optimizer) for c in fake.calls} == SEED_POINTS - {first}
    assert sorted(_points(res.rows)) == sorted(SEED_POINTS)
    killed = [r for r in res.rows if r["status"] == "INTERRUPTED"]
    assert len(killed) == 1 and "died" in killed[0]["reason"]


def test_worker_lost_on_another_machine_is_rerun_after_heartbeat_grace(tmp_path: Path) -> None:
    import optuna
    from optuna.trial import TrialState

    sweep(_cfg(tmp_path, SEED_SWEEP, n_trials=1), train_fn=FakeTrain())
    url = f"sqlite:///{tmp_path / 'sweeps' / 'cxr-sweep' / 'study.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=1)
    study_id = storage.get_study_id_from_name("cxr-sweep")
    point = {"model_name": "efficientnetv2_s", "optimizer": "AdamW"}
    ghost = optuna.trial.FrozenTrial(
        number=-1,
        trial_id=-1,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.now(),
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={
            "cxrlab_point": json.dumps(point, sort_keys=True),
            "cxrlab_params": point,
            "cxrlab_host": "other-machine",
            "cxrlab_pid": 1,
        },
        system_attrs={},
        intermediate_values={},
    )
    tid = storage.create_new_trial(study_id, template_trial=ghost)
    storage.record_heartbeat(tid)

    fresh = FakeTrain()
    res = sweep(_cfg(tmp_path, SEED_SWEEP, heartbeat_s=1, grace_s=30), train_fn=fresh)
    ghost_point = (point["model_name"], point["optimizer"])
    # the point held by a live-looking worker elsewhere is left alone ...
    assert {(c.model_name, c.optimizer) for c in fresh.calls} == SEED_POINTS - {ghost_point, FIRST_POINT}
    assert res.running_elsewhere == 1 and not res.complete
    # the other machine's worker dies: its last heartbeat ages past the grace period. The clock is moved, not
    # waited for: the stored heartbeat is set back an hour (Optuna compares it with the database's now()).
    with sqlite3.connect(tmp_path / "sweeps" / "cxr-sweep" / "study.db") as db:
        n = db.execute(
            "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-3600 seconds') WHERE trial_id = ?", (tid,)
        ).rowcount
    assert n == 1
    late = FakeTrain()
    res = sweep(_cfg(tmp_path, SEED_SWEEP, heartbeat_s=1, grace_s=30), train_fn=late)
    assert [(c.model_name, c.optimizer) for c in late.calls] == [ghost_point]
    assert res.complete and sorted(_points(res.rows)) == sorted(SEED_POINTS)  # ... until its heartbeat is stale


# ------------------------------------------------------------------------------------- real training


@pytest.mark.slow
@pytest.mark.trains
def test_cli_sweep_with_real_training_and_a_failing_trial(
    phantom_split: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The seed's model x optimizer grid shape, end to end through ``cxrlab sweep`` and the real ``train()``
    (timm's tiny test models on phantoms; the seed's real grid is measured by hand, see the module notes),
    with an invalid model name in the grid: its trials are FAILED with the reason, the rest finish."""
    from cxrlab.cli import main

    f = _write(
        tmp_path / "grid.yaml",
        {
            "name": "real",
            "method": "grid",
            "metric": {"name": "val/accuracy", "goal": "maximize"},
            "parameters": {
                "model_name": {"values": ["test_efficientnet", "no_such_model"]},
                "optimizer": {"values": ["AdamW", "RAdam"]},
                "pre_trained": {"value": False},
                "img_size": {"value": [64, 64]},
                "epochs": {"value": 1},
                "batch_size": {"value": 16},
                "trainer": {"parameters": {"limit_train_batches": {"value": 2}}},
            },
        },
    )
    out = tmp_path / "sweeps"
    argv = ["sweep", str(f), "--data", str(phantom_split), "--out", str(out)]
    argv += ["--set", "tracking.wandb=off", "trainer.enable_progress_bar=false"]  # two after one --set
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "best" in text and "no_such_model" in text and "2 failed trial(s)" in text

    import csv

    rows = list(csv.DictReader((out / "real" / "summary.csv").open()))
    assert len(rows) == 4
    ok = [r for r in rows if r["status"] == "COMPLETE"]
    bad = [r for r in rows if r["status"] == "FAILED"]
    assert {r["optimizer"] for r in ok} == {"AdamW", "RAdam"} and {r["model_name"] for r in ok} == {"test_efficientnet"}
    assert {r["model_name"] for r in bad} == {"no_such_model"} and all("no_such_model" in r["reason"] for r in bad)
    for r in ok:
        assert 0.0 <= float(r["val/accuracy"]) <= 1.0 and r["test/recall_COVID19"] != ""
        run = Path(r["run_dir"])
        assert run.parent == out / "real" / "runs" and run.name == f"real-t{int(r['trial']):03d}"
        assert (run / "bundle" / "model.safetensors").is_file() and (run / "metrics.csv").is_file()
        run_cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert run_cfg["tracking"]["group"] == "real" and run_cfg["optimizer"] == r["optimizer"]
    assert (out / "real" / "parallel_coordinates.html").stat().st_size > 1_000_000

    assert main(argv) == 0  # the same command again: nothing to run
    assert "ran 0 trial(s) here; sweep complete" in capsys.readouterr().out
