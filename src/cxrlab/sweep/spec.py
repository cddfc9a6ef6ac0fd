"""The sweep spec: W&B sweep YAML parsed and checked against the Config's keys, and the typed ``SweepConfig``."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from cxrlab.config import (
    Config,
    ConfigError,
    StrictModel,
    read_yaml,
)
from cxrlab.errors import CxrlabError

if TYPE_CHECKING:
    pass


# ---------------------------------------------------------------------------------------------- errors


class SweepError(CxrlabError):
    """The sweep cannot run as asked (backend, storage, study mismatch); the message says what to do."""


class SweepSpecError(SweepError):
    """The sweep YAML is malformed or names parameters the training Config does not have."""


# ----------------------------------------------------------------------------------------------- spec

_TOP = "program command method metric parameters name description project entity early_terminate run_cap controller"
WANDB_TOP_KEYS = frozenset([*_TOP.split(), "job", "image_uri", "imageUri"])
PARAM_KEYS = frozenset({"values", "value", "distribution", "min", "max", "q", "mu", "sigma", "a", "b", "probabilities"})
METHODS = ("grid", "random", "bayes")
# W&B's distributions (https://docs.wandb.ai/guides/sweeps/sweep-config-keys#distribution-options-for-random-and-bayesian-search)
_DISTS = (
    "constant categorical int_uniform uniform q_uniform log_uniform log_uniform_values q_log_uniform "
    "q_log_uniform_values inv_log_uniform inv_log_uniform_values normal q_normal log_normal q_log_normal beta q_beta"
)
DISTRIBUTIONS = tuple(_DISTS.split())
# Sampled with numpy, outside Optuna's model (TPE does not learn them; they are recorded per trial).
NUMPY_DISTS = frozenset({"normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta"})
# Keys the sweep sets itself for every trial.
RESERVED_KEYS = frozenset({"output_dir", "run_name"})
DEFAULT_METRIC = ("val/f1_macro", "maximize")  # the seed's checkpoint rule, used when the YAML has no metric


def _primitive(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def encode_value(v: Any) -> Any:
    """Optuna's categorical choices must be None/bool/int/float/str: lists and dicts travel as JSON text."""
    return v if _primitive(v) else json.dumps(v, sort_keys=True)


@dataclass(frozen=True)
class Param:
    """One swept Config key and how its values are drawn (W&B semantics)."""

    key: str
    distribution: str
    values: tuple[Any, ...] = ()
    min: float | None = None
    max: float | None = None
    q: float = 1.0
    mu: float = 0.0
    sigma: float = 1.0
    a: float = 1.0
    b: float = 1.0
    probabilities: tuple[float, ...] | None = None

    @property
    def is_constant(self) -> bool:
        return self.distribution == "constant"

    def grid_values(self) -> list[Any]:
        """The discrete values a grid search enumerates; error for continuous distributions."""
        if self.distribution in ("categorical", "constant"):
            return list(self.values)
        if self.distribution == "int_uniform":
            return list(range(int(self.min), int(self.max) + 1))  # type: ignore[arg-type]
        if self.distribution == "q_uniform":
            n = int(math.floor((self.max - self.min) / self.q + 1e-9))  # type: ignore[operator]
            return [round_q(self.min + i * self.q, self.q) for i in range(n + 1)]  # type: ignore[operator]
        raise SweepSpecError(
            f"grid search needs discrete parameters, but '{self.key}' has distribution '{self.distribution}'; "
            "give it `values: [...]` (or int_uniform / q_uniform), or use method: random or bayes"
        )


def round_q(x: float, q: float) -> float | int:
    v = round(x / q) * q
    if float(q).is_integer() and float(v).is_integer():
        return int(v)
    return float(f"{v:.12g}")


@dataclass(frozen=True)
class SweepSpec:
    """A parsed W&B sweep file."""

    method: Literal["grid", "random", "bayes"]
    metric: str
    goal: Literal["maximize", "minimize"]
    params: tuple[Param, ...]
    name: str | None = None
    run_cap: int | None = None
    ignored: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    early_terminate: dict[str, Any] | None = None  # {type: hyperband, min_iter, max_iter, eta} (checked)

    @property
    def searched(self) -> list[Param]:
        return [p for p in self.params if not p.is_constant]

    @property
    def constants(self) -> dict[str, Any]:
        return {p.key: p.values[0] for p in self.params if p.is_constant}

    def grid(self) -> list[dict[str, Any]]:
        """All grid points in a fixed order: parameter names sorted, product of their values in YAML order."""
        space = {p.key: p.grid_values() for p in sorted(self.searched, key=lambda p: p.key)}
        return [dict(zip(space, combo, strict=True)) for combo in itertools.product(*space.values())]

    def fingerprint(self) -> str:
        """Identity of the search (method, metric, parameters): a study may only be resumed with the same one."""
        data = {"method": self.method, "metric": [self.metric, self.goal], "params": [p.__dict__ for p in self.params]}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _num(key: str, spec: dict[str, Any], name: str, required: bool = True) -> float | None:
    if name not in spec:
        if required:
            raise SweepSpecError(f"parameter '{key}': distribution '{spec.get('distribution')}' needs '{name}'")
        return None
    v = spec[name]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise SweepSpecError(f"parameter '{key}': '{name}' must be a number, got {v!r}")
    return v


def _parse_param(key: str, spec: dict[str, Any]) -> Param:
    unknown = sorted(set(spec) - PARAM_KEYS)
    if unknown:
        raise SweepSpecError(
            f"parameter '{key}' has unknown key(s) {', '.join(unknown)}; "
            f"valid: parameters, {', '.join(sorted(PARAM_KEYS))}"
        )
    dist = spec.get("distribution")
    if dist is None:  # W&B infers the distribution from the keys present
        if "value" in spec:
            dist = "constant"
        elif "values" in spec:
            dist = "categorical"
        elif "min" in spec and "max" in spec:
            ints = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
            dist = "int_uniform" if ints else "uniform"
        else:
            raise SweepSpecError(
                f"parameter '{key}' needs `values: [...]`, `value: x`, or `distribution` with `min`/`max`; got {spec}"
            )
    if dist not in DISTRIBUTIONS:
        raise SweepSpecError(f"parameter '{key}': unknown distribution '{dist}'; valid: {', '.join(DISTRIBUTIONS)}")
    if dist == "constant":
        if "value" not in spec:
            raise SweepSpecError(f"parameter '{key}': distribution constant needs `value`")
        return Param(key, "constant", values=(spec["value"],))
    if dist == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SweepSpecError(f"parameter '{key}': `values` must be a non-empty list, got {values!r}")
        probs = spec.get("probabilities")
        if probs is not None and (not isinstance(probs, list) or len(probs) != len(values)):
            raise SweepSpecError(f"parameter '{key}': `probabilities` must be a list as long as `values`")
        return Param(key, "categorical", values=tuple(values), probabilities=tuple(probs) if probs else None)
    if dist in ("normal", "q_normal", "log_normal", "q_log_normal"):
        return Param(
            key,
            dist,
            mu=_num(key, spec, "mu", required=False) or 0.0,
            sigma=_num(key, spec, "sigma", required=False) or 1.0,
            q=_num(key, spec, "q", required=False) or 1.0,
        )
    if dist in ("beta", "q_beta"):
        return Param(
            key,
            dist,
            a=_num(key, spec, "a", required=False) or 1.0,
            b=_num(key, spec, "b", required=False) or 1.0,
            q=_num(key, spec, "q", required=False) or 1.0,
        )
    lo, hi = _num(key, spec, "min"), _num(key, spec, "max")
    q = _num(key, spec, "q", required=False) or 1.0
    if lo > hi:  # type: ignore[operator]
        raise SweepSpecError(f"parameter '{key}': min ({lo}) must not exceed max ({hi})")
    if dist.endswith("_values") and lo <= 0:  # type: ignore[operator]
        raise SweepSpecError(f"parameter '{key}': {dist} needs min > 0 (they are the values, not exponents)")
    if q <= 0:
        raise SweepSpecError(f"parameter '{key}': q must be > 0")
    if dist == "int_uniform":
        lo, hi = int(lo), int(hi)  # type: ignore[arg-type]
    return Param(key, dist, min=lo, max=hi, q=q)


def _parse_tree(tree: Any, prefix: str, out: list[Param]) -> None:
    if not isinstance(tree, dict) or not tree:
        where = f"'{prefix[:-1]}.parameters'" if prefix else "'parameters'"
        raise SweepSpecError(f"{where} must be a non-empty mapping of parameter names to specs")
    for name, spec in tree.items():
        key = f"{prefix}{name}"
        if not isinstance(spec, dict):
            raise SweepSpecError(
                f"parameter '{key}' must be a mapping like {{values: [...]}} or {{value: x}}, got {spec!r}"
            )
        if "parameters" in spec:  # W&B's nested form: augment: {parameters: {hflip_p: {values: [...]}}}
            extra = sorted(set(spec) - {"parameters"})
            if extra:
                raise SweepSpecError(f"parameter '{key}' has nested `parameters` and also {', '.join(extra)}")
            _parse_tree(spec["parameters"], key + ".", out)
        else:
            out.append(_parse_param(key, spec))


def parse_sweep_spec(source: str | Path | dict[str, Any]) -> SweepSpec:
    """Parse a W&B sweep YAML (path or already-loaded mapping) into a ``SweepSpec``.

    Keys W&B knows but the Optuna backend does not use (program, command, early_terminate, ...) are kept in
    ``ignored``; unknown top-level keys are an error (a typo such as ``paramters`` must not pass silently).
    """
    where = str(source) if not isinstance(source, dict) else "<sweep>"
    try:
        raw = read_yaml(source) if not isinstance(source, dict) else dict(source)
    except ConfigError as e:
        raise SweepSpecError(str(e).replace("config file", "sweep file")) from None
    unknown = sorted(set(raw) - WANDB_TOP_KEYS)
    if unknown:
        raise SweepSpecError(
            f"{where}: unknown sweep key(s) {', '.join(unknown)}; "
            f"a W&B sweep file has: {', '.join(sorted(WANDB_TOP_KEYS))}"
        )
    method = raw.get("method")
    if method not in METHODS:
        raise SweepSpecError(f"{where}: `method` must be one of {', '.join(METHODS)}, got {method!r}")
    metric, goal = DEFAULT_METRIC
    if "metric" in raw:
        m = raw["metric"]
        if isinstance(m, str):
            metric, goal = m, "minimize"
        elif isinstance(m, dict) and isinstance(m.get("name"), str):
            metric, goal = m["name"], m.get("goal", "minimize")  # W&B's default goal is minimize
        else:
            raise SweepSpecError(f"{where}: `metric` must look like {{name: val/accuracy, goal: maximize}}, got {m!r}")
        if goal not in ("maximize", "minimize"):
            raise SweepSpecError(f"{where}: metric.goal must be maximize or minimize, got {goal!r}")
    if "parameters" not in raw:
        raise SweepSpecError(f"{where}: no `parameters:` section")
    params: list[Param] = []
    _parse_tree(raw["parameters"], "", params)
    keys = [p.key for p in params]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise SweepSpecError(f"{where}: parameter(s) given twice: {', '.join(dup)}")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap < 1):
        raise SweepSpecError(f"{where}: run_cap must be a positive integer, got {run_cap!r}")
    early = parse_early_terminate(raw.get("early_terminate"), where)
    spec = SweepSpec(
        method=method,
        metric=metric,
        goal=goal,
        params=tuple(params),
        name=raw.get("name"),
        run_cap=run_cap,
        ignored=tuple(k for k in ("program", "command", "controller") if k in raw),
        raw=raw,
        early_terminate=early,
    )
    if method == "grid":
        for p in spec.searched:
            p.grid_values()  # raises for continuous distributions
    return spec


EARLY_TERMINATE_TYPES = ("hyperband",)
EARLY_TERMINATE_KEYS = ("type", "min_iter", "max_iter", "eta", "s", "strict")


def parse_early_terminate(et: Any, where: str = "<sweep>") -> dict[str, Any] | None:
    """W&B's ``early_terminate: {type: hyperband, min_iter: 1, eta: 2}`` checked and normalised (None if absent).

    ``min_iter`` / ``max_iter`` count epochs (the sweep metric is reported once per validation epoch); ``eta`` is
    the reduction factor (default 3, W&B's). ``s`` and ``strict`` are accepted and not used (Optuna's Hyperband
    derives its brackets from min/max resource and eta).
    """
    if et is None:
        return None
    if not isinstance(et, dict):
        raise SweepSpecError(f"{where}: `early_terminate` must be a mapping like {{type: hyperband, min_iter: 1}}")
    unknown = sorted(set(et) - set(EARLY_TERMINATE_KEYS))
    if unknown:
        raise SweepSpecError(
            f"{where}: early_terminate has unknown key(s) {', '.join(unknown)}; "
            f"valid: {', '.join(EARLY_TERMINATE_KEYS)}"
        )
    kind = et.get("type")
    if kind not in EARLY_TERMINATE_TYPES:
        raise SweepSpecError(
            f"{where}: early_terminate.type must be one of {', '.join(EARLY_TERMINATE_TYPES)}, got {kind!r}"
        )
    out: dict[str, Any] = {"type": kind}
    for key, default, lowest in (("min_iter", None, 1), ("max_iter", None, 1), ("eta", 3, 2)):
        v = et.get(key, default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lowest):
            raise SweepSpecError(f"{where}: early_terminate.{key} must be an integer >= {lowest}, got {v!r}")
        out[key] = v
    if out["min_iter"] is None and out["max_iter"] is None:
        raise SweepSpecError(f"{where}: early_terminate (hyperband) needs min_iter (epochs before the first cut)")
    if out["min_iter"] is None:
        out["min_iter"] = 1
    if out["max_iter"] is not None and out["max_iter"] < out["min_iter"]:
        raise SweepSpecError(f"{where}: early_terminate.max_iter ({out['max_iter']}) is below min_iter")
    return out


# --------------------------------------------------------------------------------- Config key checking


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every settable dotted key of the training Config (``epochs``, ``augment.hflip_p``, ...)."""
    keys: list[str] = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.append(prefix + name)
            keys.extend(config_keys(ann, prefix + name + "."))
        else:
            keys.append(prefix + name)
    return keys


def check_param_keys(keys: list[str]) -> None:
    """Raise ``SweepSpecError`` naming every key the Config lacks (and the valid ones)."""
    import difflib

    valid = config_keys()
    bad = [k for k in keys if k not in valid]
    if bad:
        hints = []
        for k in bad:
            close = difflib.get_close_matches(k, valid, n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise SweepSpecError(
            f"sweep parameter(s) not in the training Config: {', '.join(hints)}; valid keys: {', '.join(valid)}"
        )
    reserved = sorted(set(keys) & RESERVED_KEYS)
    if reserved:
        raise SweepSpecError(f"sweep parameter(s) {', '.join(reserved)} are set by the sweep itself per trial")


def flatten_params(data: dict[str, Any], prefix: str = "", keys: set[str] | None = None) -> dict[str, Any]:
    """Flatten W&B's nested run config ``{augment: {hflip_p: 0}}`` to ``{"augment.hflip_p": 0}``.

    With ``keys``, a dict value is kept whole when its dotted key is itself a swept key.
    """
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not (keys and key in keys):
            out.update(flatten_params(v, key + ".", keys))
        else:
            out[key] = v
    return out


# ------------------------------------------------------------------------------------------- config


class SweepConfig(StrictModel):
    """What ``cxrlab sweep`` runs. Paths are resolved against the current directory."""

    sweep_file: Path = Field(..., description="W&B sweep YAML (method, metric, parameters)")
    base_config: Path | None = Field(None, description="training YAML every trial starts from (e.g. configs/cpu.yaml)")
    data: str | None = Field(None, description="split directory for every trial (overrides the base config's data)")
    storage: str | None = Field(None, description="Optuna RDB URL; default sqlite:///<sweep dir>/study.db")
    n_trials: int | None = Field(
        None, ge=1, description="run at most this many trials in this command; random/bayes: also the sweep size"
    )
    backend: Literal["optuna", "wandb"] = "optuna"
    out: Path = Field(Path("sweeps"), description="parent of the sweep directory")
    name: str | None = Field(None, description="sweep/study name; default the YAML's name or the file's stem")
    overrides: list[str] = Field(default_factory=list, description="key=value applied to every trial")
    retry_failed: bool = Field(False, description="re-run points whose trial failed with an error")
    seed: int | None = Field(None, description="sampler seed (random/bayes); default the base config's seed")
    keep: Literal["best", "all"] = Field(
        "best",
        description="disk retention when the sweep ends: 'best' keeps every trial's bundle/ plus last.ckpt of the "
        "best trial (the other checkpoints, with their optimizer state, are deleted, and so are the leftover "
        "directories of interrupted trials); 'all' keeps everything",
    )
    heartbeat_s: int = Field(30, ge=1, description="seconds between a running trial's heartbeats")
    grace_s: int | None = Field(None, ge=1, description="a RUNNING trial without heartbeat this long is dead")
    verbose: bool = True
