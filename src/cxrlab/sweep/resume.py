"""Resuming an interrupted trial from its own ``last.ckpt`` instead of starting it again.

A trial whose worker died (or was Ctrl-C'd) is FAILED with ``cxrlab_failure=interrupted``. When a worker next
needs a trial, it first looks for such a trial whose run directory has a ``checkpoints/last.ckpt`` and that no
other trial has taken over (no other trial names it in ``cxrlab_resumes``; of two racing claims the lower
trial number wins); its new trial adopts the old one's parameters (and, for the
sampler and the pruner, its distributions and reported epochs) and ``train(cfg, resume=run_dir)`` continues the
old run directory. Grid sweeps only adopt an interrupted trial of the point they claimed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrlab.runs import checkpoint_path

if TYPE_CHECKING:
    import optuna

A_RESUMES, A_RESUME_DIR = "cxrlab_resumes", "cxrlab_resume_dir"


def resumed_by(trials: Iterable[tuple[int, dict[str, Any]]]) -> dict[int, int]:
    """{interrupted trial number: the number of the trial that took it over} (the lowest claim wins), from
    ``(number, user_attrs)`` of each trial."""
    out: dict[int, int] = {}
    for number, user_attrs in sorted(trials, key=lambda t: t[0]):
        old = user_attrs.get(A_RESUMES)
        if old is not None and not user_attrs.get("cxrlab_yield"):
            out.setdefault(int(old), number)
    return out


def _numbered(trials: Iterable[optuna.trial.FrozenTrial]) -> list[tuple[int, dict[str, Any]]]:
    return [(t.number, t.user_attrs) for t in trials]


def interrupted_run_dir(t: optuna.trial.FrozenTrial, runs_dir: Path, run_name: Any) -> Path | None:
    """The run directory of interrupted trial ``t`` when it can be resumed (has last.ckpt), else None."""
    from optuna.trial import TrialState

    u = t.user_attrs
    if t.state != TrialState.FAIL or u.get("cxrlab_failure") != "interrupted" or "cxrlab_params" not in u:
        return None
    run_dir = Path(u.get(A_RESUME_DIR) or u.get("cxrlab_run_dir") or runs_dir / run_name(t.number))
    return run_dir if checkpoint_path(run_dir, "last").is_file() else None


def find_resumable(
    trials: list[optuna.trial.FrozenTrial], runs_dir: Path, run_name: Any, point: str | None = None
) -> tuple[optuna.trial.FrozenTrial, Path] | None:
    """The oldest resumable interrupted trial nobody took over (of ``point``, for a grid) and its run directory."""
    taken = resumed_by(_numbered(trials))
    for t in sorted(trials, key=lambda t: t.number):
        if t.number in taken or (point is not None and t.user_attrs.get("cxrlab_point") != point):
            continue
        run_dir = interrupted_run_dir(t, runs_dir, run_name)
        if run_dir is not None:
            return t, run_dir
    return None


def adopt(
    storage: Any,
    study_id: int,
    old: optuna.trial.FrozenTrial,
    trial_id: int,
    number: int,
    run_dir: Path,
    copy_params: bool,
) -> bool:
    """Let trial ``trial_id`` take over ``old``: True when it did (False: a lower-numbered trial claimed it too)."""
    storage.set_trial_user_attr(trial_id, A_RESUMES, old.number)
    if resumed_by(_numbered(storage.get_all_trials(study_id, deepcopy=False))).get(old.number) != number:
        storage.set_trial_user_attr(trial_id, A_RESUMES, None)
        return False
    storage.set_trial_user_attr(trial_id, A_RESUME_DIR, str(run_dir))
    if copy_params:
        for name, dist in old.distributions.items():
            storage.set_trial_param(trial_id, name, dist.to_internal_repr(old.params[name]), dist)
    for step, value in sorted(old.intermediate_values.items()):
        storage.set_trial_intermediate_value(trial_id, step, value)
    return True
