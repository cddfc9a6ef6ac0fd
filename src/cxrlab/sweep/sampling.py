"""Drawing one parameter of a trial with W&B semantics through Optuna's ``suggest_*`` (numpy for the
distributions Optuna does not model)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from cxrlab.sweep.spec import NUMPY_DISTS, Param, SweepSpecError, encode_value, round_q

if TYPE_CHECKING:
    import optuna


def suggest(trial: optuna.trial.Trial, p: Param, rng: Any) -> Any:
    d, lo, hi, q = p.distribution, p.min, p.max, p.q
    if d == "categorical":
        if p.probabilities:  # Optuna has no weighted categorical: drawn here, recorded in cxrlab_params only
            probs = [float(x) for x in p.probabilities]
            return p.values[int(rng.choice(len(p.values), p=[x / sum(probs) for x in probs]))]
        enc = [encode_value(v) for v in p.values]
        return p.values[enc.index(trial.suggest_categorical(p.key, enc))]
    if d == "int_uniform":
        return trial.suggest_int(p.key, int(lo), int(hi))
    if d == "uniform":
        return trial.suggest_float(p.key, lo, hi)
    if d == "q_uniform":
        return round_q(trial.suggest_float(p.key, lo, hi), q)
    if d in ("log_uniform_values", "inv_log_uniform_values"):
        # 1/X log-uniform on [1/max, 1/min] is X log-uniform on [min, max]
        return trial.suggest_float(p.key, lo, hi, log=True)
    if d == "q_log_uniform_values":
        return round_q(trial.suggest_float(p.key, lo, hi, log=True), q)
    if d == "log_uniform":  # min/max are natural-log exponents
        return trial.suggest_float(p.key, math.exp(lo), math.exp(hi), log=True)
    if d == "q_log_uniform":
        return round_q(trial.suggest_float(p.key, math.exp(lo), math.exp(hi), log=True), q)
    if d == "inv_log_uniform":  # X = exp(-Y), Y ~ U(min, max)
        return trial.suggest_float(p.key, math.exp(-hi), math.exp(-lo), log=True)
    if d in NUMPY_DISTS:
        if d in ("normal", "q_normal"):
            x = float(rng.normal(p.mu, p.sigma))
        elif d in ("log_normal", "q_log_normal"):
            x = float(rng.lognormal(p.mu, p.sigma))
        else:
            x = float(rng.beta(p.a, p.b))
        return round_q(x, q) if d.startswith("q_") else x
    raise SweepSpecError(f"parameter '{p.key}': distribution '{d}' is not supported")
