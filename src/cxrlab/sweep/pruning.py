"""Early termination: W&B's ``early_terminate: {type: hyperband, min_iter, max_iter, eta}`` as Optuna's
``HyperbandPruner``, fed by a Lightning callback that reports the sweep metric after every validation epoch.

The callback calls ``trial.report(value, epoch)`` (epoch counted from 1, so ``min_iter: 1`` means "judged after
its first epoch") and raises ``optuna.TrialPruned`` when ``trial.should_prune()``; the trial runner turns that into
a PRUNED trial (see ``cxrlab.sweep.trial``), which counts as finished: it is not run again. The callback is ours:
Optuna's Lightning callback lives in the separate ``optuna-integration`` package (not a dependency), and this one
never cuts a trial at its last epoch and hands the epoch and value to the table's reason.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

from cxrlab.sweep.spec import SweepSpec

if TYPE_CHECKING:
    import optuna

A_PRUNED_EPOCH = "cxrlab_pruned_epoch"


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner | None:
    """The study's pruner for the spec's ``early_terminate`` (None: no early termination)."""
    import optuna

    et = spec.early_terminate
    if not et:
        return None
    return optuna.pruners.HyperbandPruner(
        min_resource=int(et["min_iter"]),
        max_resource=int(et["max_iter"]) if et.get("max_iter") else "auto",
        reduction_factor=int(et["eta"]),
    )


def pruned(epoch: int, value: float) -> optuna.TrialPruned:
    """``optuna.TrialPruned`` carrying the epoch and the last reported value (read back by the trial runner)."""
    import optuna

    exc = optuna.TrialPruned(f"pruned by hyperband after epoch {epoch} ({value:.4g})")
    exc.epoch, exc.value = epoch, value  # type: ignore[attr-defined]
    return exc


def pruning_callback(trial: optuna.trial.Trial, metric: str) -> Any:
    """A Lightning callback reporting ``metric`` to ``trial`` after each validation epoch; stops a pruned trial."""
    from lightning.pytorch.callbacks import Callback

    class _Pruning(Callback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking:
                return
            value = trainer.callback_metrics.get(metric)
            if value is None:
                return
            value = float(value)
            if not math.isfinite(value):
                return
            epoch = int(trainer.current_epoch) + 1
            with warnings.catch_warnings():  # a resumed trial may validate its checkpoint's epoch again
                warnings.filterwarnings("ignore", message=r".*is already reported.*")
                trial.report(value, epoch)
            last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
            if not last and trial.should_prune():  # a finished trial is complete: pruning it saves nothing
                raise pruned(epoch, value)

    return _Pruning()
