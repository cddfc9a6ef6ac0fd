"""The Optuna backend: the study in Optuna's RDB storage; grid points, random (``RandomSampler``) and bayes
(``TPESampler``, ``constant_liar`` for parallel workers) trials; several workers on one study.

Optuna's own: the storage and its trial rows, ``study.ask`` for random/bayes trials, the samplers, the pruner,
the heartbeat (``RDBStorage(heartbeat_interval=heartbeat_s, grace_period=grace_s)``, beaten by Optuna's
``HeartbeatThread``, the one ``Study.optimize`` runs) and the stale-trial check (``fail_stale_trials``: a
RUNNING trial whose last heartbeat is older than the grace period becomes FAIL).

Claims (hand-written). A worker claims a grid point (or a slot of a random/bayes sweep of ``run_cap`` trials) by
creating a RUNNING trial carrying the point's key, then re-reads the study: the claim stands only if no other
trial of that point is COMPLETE (or hard-FAILED) and no other live RUNNING claim has a lower trial number.
``create_new_trial`` is serialised on every backend (it locks the study row; SQLite serialises writers), so
trial numbers follow commit order: of two racing claims the higher-numbered one sees the lower one and yields
(PRUNED with ``cxrlab_yield``, left out of every table). A FAILED trial that is not a hard failure (interrupted,
or found stale) frees its point, so re-running the command finishes exactly the missing points. Optuna's own
ways do not run each point exactly once: ``GridSampler`` draws a random unstarted point per ``ask``, so two
workers can draw the same one, draws running points again once every point has started, and counts an
interrupted (FAILED) point as done for good; ``enqueue_trial`` + ``ask`` pops a WAITING trial by ``SELECT ... FOR
UPDATE``, which SQLite ignores (and pysqlite begins the transaction only at the UPDATE), so two local workers can
pop the same point, and enqueueing the grid only once would need the lower-number rule again.

Dead workers. A claim of a process that no longer runs on this machine (same host and boot id) is FAILED as
interrupted at once (hand-written: Optuna finds a dead worker only after the grace period, and the same command
re-run right after a ``kill -9`` must go on at once, with the reason that the worker died: tests/test_sweep.py
``test_killed_worker_is_resumed_by_the_same_command``); other machines' dead workers are found by
``fail_stale_trials``. No ``RetryHeartbeatStaleTrialCallback``: it re-queues a stale trial as a WAITING copy that
only ``ask`` pops (racy on SQLite, as above; grid claims never call ``ask``) and that the tables would list
twice; the claim rule re-runs the point instead. A stale trial is not resumed from its ``last.ckpt`` (only one
known to be dead is): a worker cut off from the database may still be writing to that run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrlab.sweep.pruning import make_pruner, pruning_callback
from cxrlab.sweep.resume import adopt, find_resumable
from cxrlab.sweep.sampling import suggest
from cxrlab.sweep.spec import SweepConfig, SweepError, SweepSpec, encode_value
from cxrlab.sweep.trial import TrialOutcome, TrialRunner, dict_diff, short_error

if TYPE_CHECKING:
    import optuna


# ------------------------------------------------------------------------------------ optuna backend

A_POINT, A_PARAMS, A_HOST, A_BOOT, A_PID = "cxrlab_point", "cxrlab_params", "cxrlab_host", "cxrlab_boot", "cxrlab_pid"
A_REASON, A_FAILURE, A_METRICS, A_RUN_DIR = "cxrlab_reason", "cxrlab_failure", "cxrlab_metrics", "cxrlab_run_dir"
A_YIELD = "cxrlab_yield"


def _boot_id() -> str:
    # Process ids are only comparable on the same running kernel (and pid namespace: the hostname stands in).
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def storage_url(url: str) -> str:
    """Pick an installed PostgreSQL driver for a bare ``postgresql://`` (or ``postgres://``) URL.

    SQLAlchemy >= 2.1 maps a bare ``postgresql://`` to psycopg 3; many installs (ours: psycopg2-binary) only
    have psycopg2, so the URL names whichever driver is importable. URLs with an explicit driver are kept.
    """
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    return f"postgresql://{rest}"


def redact_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


class _Beat:
    """What Optuna's ``HeartbeatThread`` calls. A failed write is skipped, not raised: raised, it would end the
    thread, and a live trial would look dead after the grace period; skipped, the next beat retries."""

    def __init__(self, storage: Any):
        self.storage = storage

    def get_heartbeat_interval(self) -> int | None:
        return self.storage.get_heartbeat_interval()

    def record_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(Exception):
            self.storage.record_heartbeat(trial_id)


def _keys(points: list[dict[str, Any]]) -> list[str]:
    """The claim key of each grid point (``cxrlab_point``)."""
    return [json.dumps(p, sort_keys=True, default=str) for p in points]


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", message=".*Heartbeat of storage.*")
            yield
    finally:
        optuna.logging.set_verbosity(level)


class OptunaSweep:
    def __init__(
        self, cfg: SweepConfig, spec: SweepSpec, name: str, sweep_dir: Path, runner: TrialRunner, console: Any
    ):
        import optuna

        self.cfg, self.spec, self.name, self.sweep_dir, self.runner, self.console = (
            cfg,
            spec,
            name,
            sweep_dir,
            runner,
            console,
        )
        url = cfg.storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
        if "://" not in url:
            raise SweepError(f"--storage must be a database URL (sqlite:///path.db, postgresql://...), got '{url}'")
        url = storage_url(url)
        self.url = url
        # SQLite: several local workers wait up to 60 s for the write lock instead of failing at once.
        sqlite = url.startswith("sqlite")
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
        grace = cfg.grace_s or 4 * cfg.heartbeat_s
        for attempt in range(5):
            try:
                with _quiet_optuna():
                    self.storage = optuna.storages.RDBStorage(
                        url, engine_kwargs=engine_kwargs, heartbeat_interval=cfg.heartbeat_s, grace_period=grace
                    )
                break
            except ImportError as e:
                raise SweepError(f"storage {redact_url(url)} needs a database driver that is not installed: {e}") from e
            except Exception as e:
                # Workers starting together on a fresh database race to create Optuna's tables; the loser's
                # INSERT fails on a unique constraint, and a second try finds the tables made.
                if attempt == 4:
                    raise SweepError(f"cannot open the study storage {redact_url(url)}: {short_error(e)}") from e
                time.sleep(0.2 + 0.3 * attempt)
        self.seed = cfg.seed if cfg.seed is not None else runner.base_cfg.seed
        direction = "maximize" if spec.goal == "maximize" else "minimize"
        with _quiet_optuna():
            self.study = optuna.create_study(
                storage=self.storage,
                study_name=name,
                direction=direction,
                sampler=self._sampler(self.seed),
                pruner=make_pruner(spec),  # None: Optuna's default, never asked (no metric is reported)
                load_if_exists=True,
            )
        self.study_id = self.storage.get_study_id_from_name(name)
        self._check_study()
        self.host, self.boot, self.pid = socket.gethostname(), _boot_id(), os.getpid()
        self.ran_here: list[int] = []

    # -- study identity
    def _check_study(self) -> None:
        # Optuna's load_if_exists loads any study of that name: the spec and the trial inputs are checked here.
        fp = self.spec.fingerprint()
        attrs = self.study.user_attrs
        if "cxrlab_fingerprint" not in attrs:
            self.study.set_user_attr("cxrlab_fingerprint", fp)
            self.study.set_user_attr("cxrlab_spec", json.loads(json.dumps(self.spec.raw, default=str)))
        elif attrs["cxrlab_fingerprint"] != fp:
            raise SweepError(
                f"study '{self.name}' in {redact_url(self.url)} was created from a different sweep spec "
                "(method, metric or parameters changed); give this sweep a new --name or --out"
            )
        trial_fp = self.runner.trial_fingerprint()
        if "cxrlab_trial_fingerprint" not in attrs:  # a new study, or one made before trial inputs were recorded
            self.study.set_user_attr("cxrlab_trial_fingerprint", trial_fp)
            self.study.set_user_attr("cxrlab_trial_input", self.runner.trial_input())
        elif attrs["cxrlab_trial_fingerprint"] != trial_fp:
            diff = dict_diff(attrs.get("cxrlab_trial_input") or {}, self.runner.trial_input())
            shown = "; ".join(diff[:5]) + (f" and {len(diff) - 5} more" if len(diff) > 5 else "")
            raise SweepError(
                f"study '{self.name}' in {redact_url(self.url)} was run with other trial settings "
                f"({shown or 'changed'}): its results would mix with these. Re-run with the same --config, "
                "--data and --set as before, or give this sweep a new --name or --out"
            )
        want = "maximize" if self.spec.goal == "maximize" else "minimize"
        if self.study.direction.name.lower() != want:
            raise SweepError(f"study '{self.name}' optimises in the other direction; use a new --name")

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        if self.spec.method == "grid":
            space = {p.key: [encode_value(v) for v in p.grid_values()] for p in self.spec.searched}
            if space:
                return optuna.samplers.GridSampler(space, seed=seed)
            return optuna.samplers.RandomSampler(seed=seed)
        if self.spec.method == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)

    # -- study state
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.storage.get_all_trials(self.study_id, deepcopy=False)

    def _mine_dead(self, t: optuna.trial.FrozenTrial) -> bool:
        u = t.user_attrs
        if u.get(A_HOST) != self.host or u.get(A_BOOT) != self.boot or A_PID not in u:
            return False
        pid = int(u[A_PID])
        return pid != self.pid and not _pid_alive(pid)

    def reap(self) -> None:
        """Mark RUNNING trials of dead workers FAILED (interrupted) so their points run again."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        for t in self.trials():
            if t.state == TrialState.RUNNING and self._mine_dead(t):
                with contextlib.suppress(UpdateFinishedTrialError):
                    self.storage.set_trial_user_attr(t._trial_id, A_FAILURE, "interrupted")
                    self.storage.set_trial_user_attr(
                        t._trial_id, A_REASON, f"worker process {t.user_attrs[A_PID]} on {self.host} died"
                    )
                    self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        with _quiet_optuna():
            fail_stale_trials(self.study)  # other machines' dead workers, after the grace period

    def _counts_as_taken(self, t: optuna.trial.FrozenTrial, mine: int | None, start_max: int) -> bool:
        """Whether trial ``t`` occupies its point/slot from the view of a claim numbered ``mine``."""
        from optuna.trial import TrialState

        if t.user_attrs.get(A_YIELD):
            return False
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):  # pruned by hyperband: finished, not re-run
            return True
        if t.state == TrialState.RUNNING:
            return mine is None or t.number < mine
        if t.state == TrialState.FAIL and t.user_attrs.get(A_FAILURE) == "error":
            return not self.cfg.retry_failed or t.number > start_max
        return False  # interrupted / stale / pruned: runnable again

    def _new_claim(self, params: dict[str, Any] | None, point: str | None) -> tuple[int, int]:
        """Create this worker's RUNNING trial (atomically with its point and identity); return (id, number)."""
        from optuna.distributions import CategoricalDistribution
        from optuna.trial import TrialState, create_trial

        user = {A_HOST: self.host, A_BOOT: self.boot, A_PID: self.pid}
        if point is None:
            with _quiet_optuna():
                trial = self.study.ask()
            for k, v in user.items():
                self.storage.set_trial_user_attr(trial._trial_id, k, v)
            self.storage.record_heartbeat(trial._trial_id)
            return trial._trial_id, trial.number
        assert params is not None
        enc = {k: encode_value(v) for k, v in params.items()}
        choices = {p.key: tuple(encode_value(v) for v in p.grid_values()) for p in self.spec.searched}
        template = create_trial(
            state=TrialState.RUNNING,
            params=enc,
            distributions={k: CategoricalDistribution(choices[k]) for k in enc},
            user_attrs={**user, A_POINT: point, A_PARAMS: params},
        )
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
        # A claim without a heartbeat row is never seen as stale by Optuna: beat at once, not only when it runs.
        self.storage.record_heartbeat(trial_id)
        return trial_id, self.storage.get_trial(trial_id).number

    def _yield(self, trial_id: int, why: str) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        with contextlib.suppress(UpdateFinishedTrialError):
            self.storage.set_trial_user_attr(trial_id, A_YIELD, True)
            self.storage.set_trial_user_attr(trial_id, A_REASON, why)
            self.storage.set_trial_state_values(trial_id, TrialState.PRUNED)

    def _finish(self, trial_id: int, out: TrialOutcome) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        try:
            self.storage.set_trial_user_attr(trial_id, A_METRICS, out.metrics)
            self.storage.set_trial_user_attr(trial_id, A_RUN_DIR, out.run_dir)
            if out.state == "COMPLETE":
                self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, values=[out.value])
            elif out.state == "PRUNED":
                self.storage.set_trial_user_attr(trial_id, A_REASON, out.reason)
                self.storage.set_trial_state_values(trial_id, TrialState.PRUNED)
            else:
                self.storage.set_trial_user_attr(trial_id, A_REASON, out.reason)
                self.storage.set_trial_user_attr(trial_id, A_FAILURE, out.failure)
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            if self.console:
                self.console.print(
                    f"[yellow]warning:[/] trial {trial_id} was marked dead by another worker while it ran "
                    f"(heartbeat missed for > grace period); its run is kept in {out.run_dir or 'its run dir'}"
                )

    def _execute(self, trial_id: int, number: int, params: dict[str, Any], resume: Path | None = None) -> None:
        import optuna
        from optuna.storages._heartbeat import HeartbeatThread  # Optuna's own, as Study.optimize runs it

        label = ", ".join(f"{k}={v}" for k, v in params.items()) or "(constants only)"
        if self.console:
            more = f" (resuming {resume.name} from its last.ckpt)" if resume else ""
            self.console.print(f"[bold cyan]sweep {self.name}[/] trial t{number:03d}: {label}{more}")
        cbs = None
        if self.spec.early_terminate and self.runner.accepts("callbacks"):  # hyperband: metric reported per epoch
            cbs = [pruning_callback(optuna.trial.Trial(self.study, trial_id), self.spec.metric)]
        try:
            with HeartbeatThread(trial_id, _Beat(self.storage)):
                out = self.runner(params, number, callbacks=cbs, resume=resume)
        except (KeyboardInterrupt, SystemExit) as e:
            # Lightning turns Ctrl-C during fit into sys.exit(1) after a graceful shutdown: the same interruption.
            why = f"interrupted ({'Ctrl-C' if isinstance(e, KeyboardInterrupt) else 'exit'}); re-run to finish"
            self._finish(trial_id, TrialOutcome("FAIL", None, {}, why, "", 0.0, "interrupted"))
            raise
        self._finish(trial_id, out)
        self.ran_here.append(number)
        if self.console:
            if out.state == "COMPLETE":
                self.console.print(
                    f"  -> {self.spec.metric} = {out.value:.4f} ({out.duration_s:.0f} s)  [dim]{out.run_dir}[/]"
                )
            elif out.state == "PRUNED":
                self.console.print(f"  -> [magenta]PRUNED[/]: {out.reason}")
            else:
                self.console.print(f"  -> [red]FAILED[/]: {out.reason}")

    # -- loops
    def run(self) -> None:
        if self.spec.method == "grid":
            self._run_grid()
        else:
            self._run_sampled()

    def _run_grid(self) -> None:
        points = self.spec.grid()
        keys = _keys(points)
        start_max = max((t.number for t in self.trials()), default=-1)
        attempted: set[str] = set()
        ran = 0
        while self.cfg.n_trials is None or ran < self.cfg.n_trials:
            self.reap()
            trials = self.trials()
            taken = {t.user_attrs.get(A_POINT) for t in trials if self._counts_as_taken(t, None, start_max)}
            free = [i for i, k in enumerate(keys) if k not in taken and k not in attempted]
            if not free:
                return
            i = free[0]
            trial_id, number = self._new_claim(points[i], keys[i])
            rivals = [
                t
                for t in self.trials()
                if t.number != number
                and t.user_attrs.get(A_POINT) == keys[i]
                and self._counts_as_taken(t, number, start_max)
            ]
            if rivals:
                self._yield(trial_id, f"point already claimed by trial {rivals[0].number}")
                continue
            attempted.add(keys[i])
            self._execute(trial_id, number, points[i], self._resume(trial_id, number, keys[i]))
            ran += 1

    def _sweep_size(self) -> int:
        size = self.spec.run_cap or self.cfg.n_trials
        if size is None:
            raise SweepError(
                f"a {self.spec.method} sweep needs a size: set run_cap in the sweep file or pass --n-trials N"
            )
        return size

    def _run_sampled(self) -> None:
        size = self._sweep_size()
        start_max = max((t.number for t in self.trials()), default=-1)
        ran = 0
        while self.cfg.n_trials is None or ran < self.cfg.n_trials:
            self.reap()
            if sum(self._counts_as_taken(t, None, start_max) for t in self.trials()) >= size:
                return
            trial_id, number = self._new_claim(None, None)
            before = sum(self._counts_as_taken(t, number, start_max) for t in self.trials() if t.number != number)
            if before >= size:
                self._yield(trial_id, "sweep already has its trials")
                continue
            resume = self._resume(trial_id, number, None)
            if resume is not None:
                params, run_dir = resume
            else:
                params, run_dir = self._sample(trial_id, number), None
            self.storage.set_trial_user_attr(trial_id, A_PARAMS, params)
            self._execute(trial_id, number, params, run_dir)
            ran += 1

    def _resume(self, trial_id: int, number: int, point: str | None) -> Any:
        """Adopt an interrupted trial with a last.ckpt: grid -> its run dir (or None); sampled -> (params, run dir)."""
        if not self.runner.accepts("resume"):
            return None
        while (found := find_resumable(self.trials(), self.runner.runs_dir, self.runner.run_name, point)) is not None:
            old, run_dir = found
            if adopt(self.storage, self.study_id, old, trial_id, number, run_dir, copy_params=point is None):
                return run_dir if point is not None else (dict(old.user_attrs[A_PARAMS]), run_dir)
        return None

    def _sample(self, trial_id: int, number: int) -> dict[str, Any]:
        """Draw the trial's parameters; the sampler is re-seeded per trial so parallel workers differ."""
        import numpy as np
        import optuna

        with _quiet_optuna():
            self.study.sampler = self._sampler(self.seed * 100_003 + number)
            trial = optuna.trial.Trial(self.study, trial_id)
        rng = np.random.default_rng([self.seed, number])
        out: dict[str, Any] = {}
        for p in self.spec.searched:
            out[p.key] = suggest(trial, p, rng)
        return out

    def counts(self) -> tuple[int, int]:
        """(points/slots still to run, trials running in live workers)."""
        from optuna.trial import TrialState

        taken = [t for t in self.trials() if self._counts_as_taken(t, None, -1)]  # -1: every hard failure counts
        running = sum(t.state == TrialState.RUNNING for t in taken)
        if self.spec.method == "grid":
            return len(set(_keys(self.spec.grid())) - {t.user_attrs.get(A_POINT) for t in taken}), running
        size = self.spec.run_cap or self.cfg.n_trials or len(taken)
        return max(0, size - len(taken)), running
