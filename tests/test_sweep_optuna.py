"""What the sweep takes from Optuna itself (issue 11): a running trial's heartbeat is beaten by Optuna's own
heartbeat thread (and a failed write does not stop it), and the summary rows are read from
``study.trials_dataframe()`` (whose integer columns with gaps come back as floats: the rows keep them whole).

The claim, kill -9 and heartbeat-grace contracts these rest on are in test_sweep.py; resume and pruning in
test_sweep_large.py."""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cxrlab.config import Config
from cxrlab.sweep.runner import sweep
from test_sweep import SEED_SWEEP, FakeTrain, _cfg
from test_sweep_large import EpochFake, _hyper_spec, _write
from test_sweep_large import _cfg as _seeded_cfg


class SlowTrain(FakeTrain):
    """A trial that takes ``seconds`` (long enough for several heartbeats)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def __call__(self, cfg: Config) -> Any:
        time.sleep(self.seconds)
        return super().__call__(cfg)


def test_running_trial_beats_optunas_heartbeat_through_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna

    beats: list[int] = []
    real = optuna.storages.RDBStorage.record_heartbeat

    def flaky(self: Any, trial_id: int) -> None:
        beats.append(trial_id)
        if len(beats) == 2:  # the first beat of the trial's heartbeat thread (the claim made the first)
            raise optuna.exceptions.StorageInternalError("database is locked")
        real(self, trial_id)

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", flaky)
    res = sweep(_cfg(tmp_path, SEED_SWEEP, n_trials=1, heartbeat_s=1), train_fn=SlowTrain(3.5))
    assert [r["status"] for r in res.rows] == ["COMPLETE"]
    assert len(set(beats)) == 1  # all for the one trial
    # the claim, the failed beat, then one a second while the trial ran: a failed write did not end the thread
    assert len(beats) >= 4, beats


def test_summary_rows_from_the_dataframe_keep_trial_numbers_and_pids_whole(tmp_path: Path) -> None:
    spec = yaml.safe_load(_hyper_spec(tmp_path, run_cap=3).read_text())
    del spec["early_terminate"]
    f = _write(tmp_path / "r.yaml", spec)
    with pytest.raises(KeyboardInterrupt):  # trial 1 is interrupted after 2 epochs, with a last.ckpt
        sweep(_seeded_cfg(tmp_path, f), train_fn=EpochFake(hang_on=2, hang_epochs=2))
    res = sweep(_seeded_cfg(tmp_path, f), train_fn=EpochFake())  # trial 2 resumes it

    with res.summary_csv.open(newline="") as fh:
        rows = {int(r["trial"]): r for r in csv.DictReader(fh)}
    assert [rows[n]["status"] for n in sorted(rows)] == ["COMPLETE", "INTERRUPTED", "COMPLETE", "COMPLETE"]
    # only trial 2 has cxrlab_resumes: in the dataframe that column is 1.0 / NaN
    assert rows[2]["reason"] == "resumed trial 1 from its last.ckpt"
    assert rows[1]["reason"].endswith("; resumed by trial 2")
    for r in rows.values():
        assert re.fullmatch(r"[^:]+:\d+", r["worker"]), r["worker"]  # host:pid, not host:123.0
        assert float(r["duration_s"]) >= 0  # Optuna's duration (start to finish) of every finished trial
    assert rows[2]["run_dir"].endswith("hb-t001")  # the interrupted trial's run directory, continued
