"""Multi-worker sweep against a real PostgreSQL server (``.ci/run`` starts Debian's ``postgresql`` and sets
``CXRLAB_TEST_POSTGRES_URL``); skipped cleanly when the variable is unset."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import pytest

from cxrlab.sweep.optuna_backend import storage_url
from cxrlab.sweep.runner import sweep
from test_sweep import (
    SEED_POINTS,
    SEED_SWEEP,
    FakeTrain,
    _cfg,
    _points,
    assert_split_without_duplicates,
    run_two_workers,
)

pytestmark = pytest.mark.postgres
URL = os.environ.get("CXRLAB_TEST_POSTGRES_URL")


@pytest.fixture
def pg_study() -> str:
    if not URL:
        pytest.skip("CXRLAB_TEST_POSTGRES_URL is not set (.ci/run sets it after starting PostgreSQL)")
    pytest.importorskip("psycopg2", reason="psycopg2 (the PostgreSQL driver) is not installed")
    name = f"cxrlab-test-{uuid.uuid4().hex[:10]}"  # a fresh study per run: the database outlives the test
    yield name
    import optuna

    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=storage_url(URL))


def test_two_workers_split_a_grid_on_postgres(tmp_path: Path, pg_study: str) -> None:
    assert URL is not None
    calls = run_two_workers(tmp_path, storage=URL, name=pg_study)
    assert_split_without_duplicates(calls)
    fake = FakeTrain()
    res = sweep(_cfg(tmp_path, SEED_SWEEP, storage=URL, name=pg_study), train_fn=fake)  # resumes: nothing left
    assert fake.calls == [] and res.complete and sorted(_points(res.rows)) == sorted(SEED_POINTS)
    assert "cxrlab:***@" in res.storage or "***" in res.storage  # the password is not printed
