"""Hyper-parameter sweeps from a W&B sweep YAML, run locally (Optuna, no server) or on many machines.

``sweep(SweepConfig) -> SweepResult`` reads the W&B sweep file format unchanged (``method``, ``metric``,
``parameters`` with ``values`` / ``value`` / ``distribution`` + ``min`` / ``max`` / ``q`` / ..., dotted keys or
W&B's nested ``parameters:`` form) and runs each trial as an ordinary ``train()`` run whose config is the
base config plus the trial's parameters as overrides.

Backends
- ``optuna`` (default): the study lives in an RDB storage, by default ``sqlite:///<sweep dir>/study.db``;
  ``--storage postgresql://...`` lets workers on many machines run the same command against one study.
  grid -> every point of the grid (``GridSampler`` is the study's sampler; points are claimed as below),
  random -> ``RandomSampler``, bayes -> ``TPESampler`` (``constant_liar`` for parallel workers).
- ``wandb``: registers the same YAML with ``wandb.sweep`` and runs ``wandb.agent`` with the same trial function
  (needs a W&B server; offline it fails with a message pointing back to the optuna backend).

Why grid points are claimed by hand instead of letting ``GridSampler`` pick them: GridSampler picks a random
unfinished point per trial, so two workers can pick the same one, and a killed worker's RUNNING trial blocks
its point forever. Here every worker claims a point by creating a RUNNING trial carrying the point's key, then
re-reads the study: the claim stands only if no other trial of that point is COMPLETE (or hard-FAILED) and no
other live RUNNING claim has a lower trial number. Optuna's RDB storage creates trials one at a time (it locks
the study row; SQLite serialises writers), so trial numbers follow commit order: of two racing claims the
higher-numbered one always sees the lower one and yields (its trial is marked PRUNED with ``cxrlab_yield`` and
left out of every table). A claim whose worker died is recognised by its process id when it ran on this
machine (immediately) or by its missing heartbeat (after ``grace_s``), marked FAILED as interrupted, and its
point becomes runnable again, so re-running the command finishes exactly the missing points.

A trial that raises (bad parameter, invalid model name, out of memory, NaN loss), or whose objective is
missing or not finite, is recorded as FAILED with its reason (trial user attribute ``cxrlab_reason``; full
traceback in ``logs/<sweep>-t<NNN>.txt``) and the sweep goes on. Hard failures are not re-run unless
``retry_failed``; interrupted trials (Ctrl-C, killed worker) always are.

Trial config = base YAML -> ``evaluate=test`` and ``tracking.group=<sweep>`` (so the table has test metrics
and W&B groups the trials; ``--set`` can change both) -> ``--data`` -> ``--set`` overrides -> the YAML's
constants and the trial's parameters -> ``output_dir=<sweep dir>/runs``, ``run_name=<sweep>-t<NNN>``.
The objective is the YAML's metric from ``RunResult.metrics`` (the best epoch's), else the best epoch value in
the run's ``metrics.csv``. Sweep size: grid = every point; random/bayes = ``run_cap`` from the YAML, else
``n_trials``; ``n_trials`` also caps how many trials one command runs.

Outputs in ``<out>/<name>/``: ``study.db`` (default storage), ``runs/`` (one run directory per trial),
``summary.csv`` (one row per trial of the whole study), ``parallel_coordinates.html`` (self-contained plotly),
``best.json``, ``logs/`` (tracebacks of failed trials).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import itertools
import json
import math
import os
import socket
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from cxrlab.atomic import write_json
from cxrlab.config import (
    Config,
    ConfigError,
    StrictModel,
    apply_overrides,
    build_config,
    parse_override,
    read_yaml,
    set_dotted,
)
from cxrlab.errors import CxrlabError
from cxrlab.runs import BEST_CKPT, CKPT_DIR, METRICS_FILE

if TYPE_CHECKING:
    import optuna
    from rich.console import Console
    from rich.table import Table

TrainFn = Callable[[Config], Any]

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
_NUMPY_DISTS = frozenset({"normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta"})
# Keys the sweep sets itself for every trial.
RESERVED_KEYS = frozenset({"output_dir", "run_name"})
DEFAULT_METRIC = ("val/f1_macro", "maximize")  # the seed's checkpoint rule, used when the YAML has no metric


def _primitive(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def _encode(v: Any) -> Any:
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
            return [_round_q(self.min + i * self.q, self.q) for i in range(n + 1)]  # type: ignore[operator]
        raise SweepSpecError(
            f"grid search needs discrete parameters, but '{self.key}' has distribution '{self.distribution}'; "
            "give it `values: [...]` (or int_uniform / q_uniform), or use method: random or bayes"
        )


def _round_q(x: float, q: float) -> float | int:
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
    spec = SweepSpec(
        method=method,
        metric=metric,
        goal=goal,
        params=tuple(params),
        name=raw.get("name"),
        run_cap=run_cap,
        ignored=tuple(k for k in ("program", "command", "early_terminate", "controller") if k in raw),
        raw=raw,
    )
    if method == "grid":
        for p in spec.searched:
            p.grid_values()  # raises for continuous distributions
    return spec


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


# ------------------------------------------------------------------------------------------- result


@dataclass
class SweepResult:
    """Outcome of one ``sweep`` command. ``rows`` cover the whole study (every worker), one per trial."""

    name: str
    sweep_dir: Path
    storage: str
    backend: str
    method: str
    metric: str
    goal: str
    params: list[str]
    constants: dict[str, Any]
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    failed: list[dict[str, Any]]
    ran_here: list[int]
    pending: int
    running_elsewhere: int
    summary_csv: Path
    plot_html: Path | None
    ignored_keys: tuple[str, ...] = ()
    disk_bytes: int = 0  # the sweep directory after retention
    freed_bytes: int = 0  # deleted by retention in this command

    @property
    def complete(self) -> bool:
        return self.pending == 0 and self.running_elsewhere == 0


# --------------------------------------------------------------------------------------- the trial


@dataclass
class TrialOutcome:
    state: Literal["COMPLETE", "FAIL"]
    value: float | None
    metrics: dict[str, float]
    reason: str
    run_dir: str
    duration_s: float
    failure: str = ""  # "error" (hard, not re-run) | "interrupted" (re-run)


def _short(exc: BaseException, limit: int = 400) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {msg}" if not isinstance(exc, CxrlabError) else msg
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(exc, RuntimeError | MemoryError) and (
        "out of memory" in str(exc).lower() or isinstance(exc, MemoryError)
    )


def _free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _metrics_from(result: Any) -> dict[str, float]:
    raw = getattr(result, "metrics", None) or {}
    out: dict[str, float] = {}
    for k, v in dict(raw).items():
        with contextlib.suppress(TypeError, ValueError):
            out[str(k)] = float(v)
    return out


def _metric_from_csv(run_dir: Path, metric: str, goal: str) -> float | None:
    """Best epoch value of ``metric`` in the run's metrics.csv (the W&B-summary fallback)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    vals: list[float] = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            with contextlib.suppress(TypeError, ValueError, KeyError):
                v = float(row[metric])
                if math.isfinite(v):
                    vals.append(v)
    if not vals:
        return None
    return max(vals) if goal == "maximize" else min(vals)


# Keys that say where or how a trial runs, not what it computes: they may differ between the workers of a study.
_MACHINE_KEYS = ("tracking", "output_dir", "run_name", "num_workers", "threads", "device", "devices", "cache_images")


def _data_identity(data: str) -> str | None:
    """A split directory as its dataset version (the same on every machine that holds a copy), else its absolute
    path; None for a path that does not exist (no trial could train on it: nothing to mix up)."""
    p = Path(data).expanduser()
    if not p.exists():
        return None
    meta = (p if p.is_dir() else p.parent) / "split.json"
    try:
        version = json.loads(meta.read_text()).get("dataset_version")
    except (OSError, ValueError, AttributeError):
        version = None
    return f"dataset_version:{version}" if version else os.path.abspath(p)


def _dict_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each dotted key whose value differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _dict_diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


class _Runner:
    """Builds a trial's Config from the base + overrides + parameters and runs ``train_fn`` on it."""

    def __init__(self, cfg: SweepConfig, spec: SweepSpec, name: str, sweep_dir: Path, train_fn: TrainFn):
        self.cfg, self.spec, self.name, self.sweep_dir, self.train_fn = cfg, spec, name, sweep_dir, train_fn
        base = read_yaml(cfg.base_config) if cfg.base_config else {}
        # Trials evaluate on test so the table has test metrics; `--set evaluate=val` turns that off.
        defaults = ["evaluate=test", f"tracking.group={name}"]
        base = apply_overrides(base, defaults)
        tags = list((base.get("tracking") or {}).get("tags") or [])
        base["tracking"]["tags"] = [*tags, f"sweep:{name}"]
        if cfg.data:
            base["data"] = cfg.data
        swept = {p.key for p in spec.params}
        for ov in cfg.overrides:
            key = ".".join(parse_override(ov)[0])
            if key in RESERVED_KEYS:
                raise SweepError(
                    f"--set {ov}: a sweep names and places every trial itself ({name}-tNNN under "
                    f"{sweep_dir / 'runs'}); choose the place with --out and the name with --name instead"
                )
            if key in swept:
                raise SweepError(f"--set {ov} conflicts with the sweep parameter '{key}'; remove one of them")
        self.base = apply_overrides(base, cfg.overrides)
        for k, v in spec.constants.items():
            set_dotted(self.base, k.split("."), v)
        src = f"{cfg.base_config or 'defaults'} + sweep overrides"
        self.base_cfg = build_config(Config, self.base, source=src)  # the user's own mistakes fail before any trial
        swept_data = "data" in swept
        if self.base_cfg.data is None and not swept_data:
            raise SweepError("trials need data: pass --data SPLIT_DIR or set `data:` in the base config (--config)")
        self.runs_dir = sweep_dir / "runs"
        self.logs_dir = sweep_dir / "logs"

    def trial_input(self) -> dict[str, Any]:
        """What every trial starts from (the resolved base config after --config, --data and --set, without the
        sweep's own and the per-machine keys; the data as its dataset version when it has one): a resumed or joined
        study must be run with the same."""
        d = self.base_cfg.model_dump(mode="json")
        for k in _MACHINE_KEYS:
            d.pop(k, None)
        for k in ("enable_progress_bar", "log_every_n_steps"):
            d.get("trainer", {}).pop(k, None)
        if d.get("data"):
            d["data"] = _data_identity(d["data"])
        if d.get("data") is None:
            d.pop("data", None)
        return d

    def trial_fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.trial_input(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run_name(self, number: int | str) -> str:
        return f"{self.name}-t{number:03d}" if isinstance(number, int) else f"{self.name}-{number}"

    def build(self, params: dict[str, Any], number: int | str) -> Config:
        data = json.loads(json.dumps(self.base))
        for k, v in params.items():
            set_dotted(data, k.split("."), v)
        data["output_dir"] = str(self.runs_dir)
        data["run_name"] = self.run_name(number)
        return build_config(Config, data, source=f"trial {self.run_name(number)}")

    def __call__(self, params: dict[str, Any], number: int | str) -> TrialOutcome:
        t0 = time.perf_counter()
        run_dir = self.runs_dir / self.run_name(number)
        metric, goal = self.spec.metric, self.spec.goal

        def fail(reason: str, failure: str = "error", metrics: dict[str, float] | None = None) -> TrialOutcome:
            return TrialOutcome(
                "FAIL",
                None,
                metrics or {},
                reason,
                str(run_dir) if run_dir.exists() else "",
                time.perf_counter() - t0,
                failure,
            )

        try:
            trial_cfg = self.build(params, number)
            result = self.train_fn(trial_cfg)
        except Exception as e:
            self._log(number, e)
            if _is_oom(e):
                _free_memory()
                return fail(f"out of memory: {_short(e)}")
            return fail(_short(e))
        run_dir = Path(getattr(result, "run_dir", run_dir) or run_dir)
        metrics = _metrics_from(result)
        value = metrics.get(metric)
        if value is None:
            value = _metric_from_csv(run_dir, metric, goal)
        if value is None:
            have = ", ".join(sorted(metrics)) or "none"
            return fail(f"metric '{metric}' was not logged by the run (logged: {have})", metrics=metrics)
        if not math.isfinite(value):
            return fail(f"objective {metric} is {value} (diverged: NaN/inf loss?)", metrics=metrics)
        return TrialOutcome("COMPLETE", float(value), metrics, "", str(run_dir), time.perf_counter() - t0)

    def _log(self, number: int | str, exc: BaseException) -> None:
        with contextlib.suppress(OSError):
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            (self.logs_dir / f"{self.run_name(number)}.txt").write_text(tb)


# ------------------------------------------------------------------------------------ optuna backend

A_POINT, A_PARAMS, A_HOST, A_BOOT, A_PID = "cxrlab_point", "cxrlab_params", "cxrlab_host", "cxrlab_boot", "cxrlab_pid"
A_REASON, A_FAILURE, A_METRICS, A_RUN_DIR = "cxrlab_reason", "cxrlab_failure", "cxrlab_metrics", "cxrlab_run_dir"
A_DURATION, A_YIELD = "cxrlab_duration_s", "cxrlab_yield"


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
    except PermissionError:
        return True
    except OSError:
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


class _Heartbeat:
    """Records the trial's heartbeat every ``interval`` seconds in a daemon thread until stopped."""

    def __init__(self, storage: Any, trial_id: int, interval: int):
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cxrlab-heartbeat-{trial_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # a missed beat is retried; the grace period allows for it
                self._storage.record_heartbeat(self._trial_id)

    def __enter__(self) -> _Heartbeat:
        self._storage.record_heartbeat(self._trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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


class _OptunaSweep:
    def __init__(self, cfg: SweepConfig, spec: SweepSpec, name: str, sweep_dir: Path, runner: _Runner, console: Any):
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
                    raise SweepError(f"cannot open the study storage {redact_url(url)}: {_short(e)}") from e
                time.sleep(0.2 + 0.3 * attempt)
        self.seed = cfg.seed if cfg.seed is not None else runner.base_cfg.seed
        direction = "maximize" if spec.goal == "maximize" else "minimize"
        with _quiet_optuna():
            self.study = optuna.create_study(
                storage=self.storage,
                study_name=name,
                direction=direction,
                sampler=self._sampler(self.seed),
                load_if_exists=True,
            )
        self.study_id = self.storage.get_study_id_from_name(name)
        self._check_study()
        self.host, self.boot, self.pid = socket.gethostname(), _boot_id(), os.getpid()
        self.ran_here: list[int] = []

    # -- study identity
    def _check_study(self) -> None:
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
            diff = _dict_diff(attrs.get("cxrlab_trial_input") or {}, self.runner.trial_input())
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
            space = {p.key: [_encode(v) for v in p.grid_values()] for p in self.spec.searched}
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
        if t.state == TrialState.COMPLETE:
            return True
        if t.state == TrialState.RUNNING:
            return mine is None or t.number < mine
        if t.state == TrialState.FAIL and t.user_attrs.get(A_FAILURE) == "error":
            return not self.cfg.retry_failed or t.number > start_max
        return False  # interrupted / stale / pruned: runnable again

    def _new_claim(self, params: dict[str, Any] | None, point: str | None) -> tuple[int, int]:
        """Create this worker's RUNNING trial (atomically with its point and identity); return (id, number)."""
        import optuna
        from optuna.distributions import CategoricalDistribution
        from optuna.trial import TrialState

        user = {A_HOST: self.host, A_BOOT: self.boot, A_PID: self.pid}
        if point is None:
            with _quiet_optuna():
                trial = self.study.ask()
            for k, v in user.items():
                self.storage.set_trial_user_attr(trial._trial_id, k, v)
            self.storage.record_heartbeat(trial._trial_id)
            return trial._trial_id, trial.number
        assert params is not None
        enc = {k: _encode(v) for k, v in params.items()}
        choices = {p.key: tuple(_encode(v) for v in p.grid_values()) for p in self.spec.searched}
        template = optuna.trial.FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.now(),
            datetime_complete=None,
            params=enc,
            distributions={k: CategoricalDistribution(choices[k]) for k in enc},
            user_attrs={**user, A_POINT: point, A_PARAMS: params},
            system_attrs={},
            intermediate_values={},
            trial_id=-1,
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
            self.storage.set_trial_user_attr(trial_id, A_DURATION, round(out.duration_s, 2))
            if out.state == "COMPLETE":
                self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, values=[out.value])
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

    def _execute(self, trial_id: int, number: int, params: dict[str, Any]) -> None:
        label = ", ".join(f"{k}={v}" for k, v in params.items()) or "(constants only)"
        if self.console:
            self.console.print(f"[bold cyan]sweep {self.name}[/] trial t{number:03d}: {label}")
        try:
            with _Heartbeat(self.storage, trial_id, self.cfg.heartbeat_s):
                out = self.runner(params, number)
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
        keys = [json.dumps(p, sort_keys=True, default=str) for p in points]
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
            self._execute(trial_id, number, points[i])
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
            params = self._sample(trial_id, number)
            self.storage.set_trial_user_attr(trial_id, A_PARAMS, params)
            self._execute(trial_id, number, params)
            ran += 1

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
            out[p.key] = _suggest(trial, p, rng)
        return out

    def counts(self) -> tuple[int, int]:
        """(points/slots still to run, trials running in live workers)."""
        from optuna.trial import TrialState

        trials = [t for t in self.trials() if not t.user_attrs.get(A_YIELD)]
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if self.spec.method == "grid":
            keys = {json.dumps(p, sort_keys=True, default=str) for p in self.spec.grid()}
            done = {
                t.user_attrs.get(A_POINT)
                for t in trials
                if t.state == TrialState.COMPLETE
                or (t.state == TrialState.FAIL and t.user_attrs.get(A_FAILURE) == "error")
            }
            run_pts = {t.user_attrs.get(A_POINT) for t in trials if t.state == TrialState.RUNNING}
            return len(keys - done - run_pts), running
        done_n = sum(
            t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and t.user_attrs.get(A_FAILURE) == "error")
            for t in trials
        )
        size = self.spec.run_cap or self.cfg.n_trials or done_n
        return max(0, size - done_n - running), running


def _suggest(trial: optuna.trial.Trial, p: Param, rng: Any) -> Any:
    d, lo, hi, q = p.distribution, p.min, p.max, p.q
    if d == "categorical":
        if p.probabilities:  # Optuna has no weighted categorical: drawn here, recorded in cxrlab_params only
            probs = [float(x) for x in p.probabilities]
            return p.values[int(rng.choice(len(p.values), p=[x / sum(probs) for x in probs]))]
        enc = [_encode(v) for v in p.values]
        return p.values[enc.index(trial.suggest_categorical(p.key, enc))]
    if d == "int_uniform":
        return trial.suggest_int(p.key, int(lo), int(hi))
    if d == "uniform":
        return trial.suggest_float(p.key, lo, hi)
    if d == "q_uniform":
        return _round_q(trial.suggest_float(p.key, lo, hi), q)
    if d in ("log_uniform_values", "inv_log_uniform_values"):
        # 1/X log-uniform on [1/max, 1/min] is X log-uniform on [min, max]
        return trial.suggest_float(p.key, lo, hi, log=True)
    if d == "q_log_uniform_values":
        return _round_q(trial.suggest_float(p.key, lo, hi, log=True), q)
    if d == "log_uniform":  # min/max are natural-log exponents
        return trial.suggest_float(p.key, math.exp(lo), math.exp(hi), log=True)
    if d == "q_log_uniform":
        return _round_q(trial.suggest_float(p.key, math.exp(lo), math.exp(hi), log=True), q)
    if d == "inv_log_uniform":  # X = exp(-Y), Y ~ U(min, max)
        return trial.suggest_float(p.key, math.exp(-hi), math.exp(-lo), log=True)
    if d in _NUMPY_DISTS:
        if d in ("normal", "q_normal"):
            x = float(rng.normal(p.mu, p.sigma))
        elif d in ("log_normal", "q_log_normal"):
            x = float(rng.lognormal(p.mu, p.sigma))
        else:
            x = float(rng.beta(p.a, p.b))
        return _round_q(x, q) if d.startswith("q_") else x
    raise SweepSpecError(f"parameter '{p.key}': distribution '{d}' is not supported")


# ------------------------------------------------------------------------------------- summary/plot


def _trial_rows(trials: list[Any], spec: SweepSpec) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    rows: list[dict[str, Any]] = []
    for t in sorted(trials, key=lambda t: t.number):
        u = t.user_attrs
        if u.get(A_YIELD):
            continue
        if t.state == TrialState.COMPLETE:
            status, reason = "COMPLETE", ""
        elif t.state == TrialState.RUNNING:
            status, reason = "RUNNING", f"on {u.get(A_HOST, '?')} pid {u.get(A_PID, '?')}"
        elif t.state == TrialState.FAIL and u.get(A_FAILURE) == "error":
            status, reason = "FAILED", u.get(A_REASON, "")
        elif t.state == TrialState.FAIL:
            status = "INTERRUPTED"
            reason = u.get(A_REASON) or "worker lost (no heartbeat within the grace period)"
        else:
            status, reason = t.state.name, u.get(A_REASON, "")
        rows.append(
            {
                "trial": t.number,
                "status": status,
                "params": dict(u.get(A_PARAMS) or {}),
                "objective": t.value if t.state == TrialState.COMPLETE else None,
                "metrics": dict(u.get(A_METRICS) or {}),
                "reason": reason,
                "run_dir": u.get(A_RUN_DIR, ""),
                "worker": f"{u.get(A_HOST, '')}:{u.get(A_PID, '')}",
                "duration_s": u.get(A_DURATION),
                "point": u.get(A_POINT, ""),
            }
        )
    return rows


def _best(rows: list[dict[str, Any]], goal: str) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] == "COMPLETE" and r["objective"] is not None]
    if not done:
        return None
    sign = -1.0 if goal == "maximize" else 1.0
    return min(done, key=lambda r: (sign * r["objective"], r["trial"]))


def _failed(rows: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """Failed trials whose point never completed later (a point retried successfully is not a failure)."""
    completed = {r["point"] for r in rows if r["status"] == "COMPLETE" and r["point"]}
    return [r for r in rows if r["status"] == "FAILED" and not (method == "grid" and r["point"] in completed)]


def _metric_columns(rows: list[dict[str, Any]], metric: str) -> list[str]:
    names = {k for r in rows for k in r["metrics"]}
    val = sorted(k for k in names if k.startswith("val/") and k != metric)
    test = sorted(k for k in names if k.startswith("test/") and k != metric)
    other = sorted(names - set(val) - set(test) - {metric})
    return [metric, *val, *test, *other]


def write_summary_csv(rows: list[dict[str, Any]], params: list[str], metric: str, path: Path) -> Path:
    """One row per trial: trial, status, parameters, objective + every val/test metric, reason, run dir."""
    mcols = _metric_columns(rows, metric)
    header = ["trial", "status", *params, *mcols, "reason", "duration_s", "worker", "run_dir"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several workers may write it: replace atomically
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            vals = {**r["metrics"]}
            if r["objective"] is not None:
                vals[metric] = r["objective"]
            w.writerow(
                [
                    r["trial"],
                    r["status"],
                    *[_cell(r["params"].get(p, "")) for p in params],
                    *[_cell(vals.get(m, "")) for m in mcols],
                    r["reason"],
                    r["duration_s"] if r["duration_s"] is not None else "",
                    r["worker"],
                    r["run_dir"],
                ]
            )
    tmp.replace(path)
    return path


def _cell(v: Any) -> Any:
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.6g}")  # float32 metrics: 0.3333333432674408 -> 0.333333
    return json.dumps(v) if isinstance(v, list | dict) else v


def covid_recall_key(names: list[str] | set[str]) -> str | None:
    """The test recall column of the COVID class (``test/recall_COVID19``), when the data has one."""
    for n in sorted(names):
        if n.startswith("test/recall_") and "covid" in n.lower():
            return n
    return None


def write_parcoords(rows: list[dict[str, Any]], params: list[str], spec: SweepSpec, path: Path, title: str) -> Path:
    """Self-contained interactive parallel-coordinates HTML (plotly, JS inlined) of the completed trials.

    Categorical parameters become integer axes with their values as tick labels, like W&B's view.
    """
    import plotly.graph_objects as go

    done = [r for r in rows if r["status"] == "COMPLETE" and r["objective"] is not None]
    dims: list[dict[str, Any]] = []
    declared = {p.key: p for p in spec.params}
    for key in params:
        vals = [r["params"].get(key) for r in done]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals) and vals
        if numeric:
            dims.append({"label": key, "values": vals})
        else:
            order = [_cell(v) for v in declared[key].values] if key in declared and declared[key].values else []
            for v in vals:
                if _cell(v) not in order:
                    order.append(_cell(v))
            idx = {str(v): i for i, v in enumerate(order)}
            dims.append(
                {
                    "label": key,
                    "values": [idx[str(_cell(v))] for v in vals],
                    "tickvals": list(range(len(order))),
                    "ticktext": [str(v) for v in order],
                    "range": [-0.25, max(len(order) - 1, 0) + 0.25],
                }
            )
    objective = [r["objective"] for r in done]
    dims.append({"label": spec.metric, "values": objective})
    names = {k for r in done for k in r["metrics"]}
    for extra in ("test/f1_macro", covid_recall_key(names)):
        if extra and extra in names and extra != spec.metric:
            dims.append({"label": extra, "values": [r["metrics"].get(extra, float("nan")) for r in done]})
    fig = go.Figure(
        go.Parcoords(
            line={
                "color": objective or [0],
                "colorscale": "Viridis",
                "showscale": True,
                "colorbar": {"title": {"text": spec.metric}},
            },
            dimensions=dims,
            customdata=[r["trial"] for r in done],
        )
    )
    failed = sum(r["status"] == "FAILED" for r in rows)
    sub = f"{len(done)} completed trial(s)" + (f", {failed} failed (not plotted)" if failed else "")
    fig.update_layout(
        title={"text": f"{title}<br><sup>{sub}</sup>", "y": 0.97}, margin={"l": 110, "r": 80, "t": 130, "b": 40}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)  # True = plotly.js inlined: opens offline
    tmp.replace(path)
    return path


def summary_table(result: SweepResult, max_reason: int = 60) -> Table:
    """The rich table the CLI prints: parameters -> objective, key val/test metrics, status."""
    from rich.table import Table

    names = {k for r in result.rows for k in r["metrics"]}
    extra = [
        k
        for k in ("val/f1_macro", "val/accuracy", "test/accuracy", "test/f1_macro", covid_recall_key(names))
        if k and k in names and k != result.metric
    ]
    t = Table(title=f"sweep {result.name}: {result.method}, {result.goal} {result.metric}", title_justify="left")
    t.add_column("trial", justify="right")
    for p in result.params:
        t.add_column(p)
    t.add_column(result.metric, justify="right", style="bold")
    for k in extra:
        t.add_column(k, justify="right")
    t.add_column("status")
    show_reason = any(r["reason"] for r in result.rows)
    if show_reason:
        t.add_column("reason", overflow="fold")
    best = result.best["trial"] if result.best else None
    colour = {"COMPLETE": "green", "FAILED": "red", "RUNNING": "cyan", "INTERRUPTED": "yellow"}
    for r in result.rows:
        fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        reason = r["reason"] if len(r["reason"]) <= max_reason else r["reason"][: max_reason - 3] + "..."
        t.add_row(
            f"{r['trial']}{' *' if r['trial'] == best else ''}",
            *[str(_cell(r["params"].get(p, ""))) for p in result.params],
            fmt(r["objective"]),
            *[fmt(r["metrics"].get(k)) for k in extra],
            f"[{colour.get(r['status'], 'white')}]{r['status']}[/]",
            *([reason] if show_reason else []),
        )
    return t


def apply_retention(rows: list[dict[str, Any]], best: dict[str, Any] | None, runner: _Runner) -> int:
    """``keep=best``: the best trial keeps bundle/ + last.ckpt, other finished trials keep bundle/ only, interrupted
    trials' leftover directories go. Only finished trials are touched (never one running elsewhere). Returns the
    bytes freed."""
    import shutil

    from cxrlab.training.train import disk_usage

    runs = runner.runs_dir.resolve()
    freed = 0

    def inside(p: Path) -> bool:
        try:
            return p.resolve().is_relative_to(runs) and p.resolve() != runs
        except OSError:
            return False

    def drop(p: Path) -> None:
        nonlocal freed
        if not p.exists() or not inside(p):
            return
        size = disk_usage(p) if p.is_dir() else p.stat().st_size
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        freed += size

    best_trial = best["trial"] if best else None
    for r in rows:
        if r["status"] == "COMPLETE" and r["run_dir"]:
            ckpts = Path(r["run_dir"]) / CKPT_DIR
            if r["trial"] == best_trial:
                drop(ckpts / BEST_CKPT)  # its weights are the bundle's; last.ckpt continues training
            else:
                drop(ckpts)
        elif r["status"] == "INTERRUPTED":
            drop(runner.runs_dir / runner.run_name(r["trial"]))
    return freed


def _write_outputs(rows: list[dict[str, Any]], spec: SweepSpec, name: str, sweep_dir: Path) -> tuple[Path, Path | None]:
    params = [p.key for p in spec.searched]
    csv_path = write_summary_csv(rows, params, spec.metric, sweep_dir / "summary.csv")
    plot = write_parcoords(rows, params, spec, sweep_dir / "parallel_coordinates.html", f"sweep {name}")
    best = _best(rows, spec.goal)
    write_json(sweep_dir / "best.json", best, default=str)
    return csv_path, plot


# -------------------------------------------------------------------------------------- wandb backend


def _run_wandb(
    cfg: SweepConfig, spec: SweepSpec, name: str, sweep_dir: Path, runner: _Runner, console: Any
) -> tuple[list[dict[str, Any]], list[int]]:
    from cxrlab.tracking import resolve_wandb_mode

    mode = resolve_wandb_mode(runner.base_cfg.tracking.wandb)
    if mode != "online":
        raise SweepError(
            f"W&B sweeps need a W&B server, and W&B is {mode} here (not logged in, WANDB_MODE={mode}, or "
            "tracking.wandb set). Use the default optuna backend, which needs no server: drop --backend wandb "
            "(trials still log to W&B offline; `wandb sync` them later)"
        )
    import wandb

    raw = dict(spec.raw)  # the user's YAML as written; only a missing name/metric is filled in
    raw.setdefault("name", name)
    raw.setdefault("metric", {"name": spec.metric, "goal": spec.goal})
    project, entity = runner.base_cfg.project, runner.base_cfg.tracking.entity
    try:
        sweep_id = wandb.sweep(sweep=raw, project=project, entity=entity)
    except Exception as e:
        raise SweepError(f"W&B refused the sweep: {_short(e)}") from e
    rows: list[dict[str, Any]] = []
    keys = {p.key for p in spec.params}

    def trial() -> None:
        # The agent's run carries the parameters; train()'s WandbLogger attaches to it (and finishes it).
        with wandb.init(group=name, job_type="sweep-trial") as run:
            params = flatten_params(dict(run.config), keys=keys)
            params = {k: v for k, v in params.items() if k in keys and k not in spec.constants}
            n = len(rows)
            out = runner(params, f"t{n:03d}-{run.id}")
            with contextlib.suppress(Exception):  # the run may already be finished by train()
                run.summary.update({"sweep/status": out.state, "sweep/reason": out.reason})
            rows.append(
                {
                    "trial": n,
                    "status": "COMPLETE" if out.state == "COMPLETE" else "FAILED",
                    "params": params,
                    "objective": out.value,
                    "metrics": out.metrics,
                    "reason": out.reason,
                    "run_dir": out.run_dir,
                    "worker": f"wandb:{run.id}",
                    "duration_s": round(out.duration_s, 2),
                    "point": json.dumps(params, sort_keys=True, default=str),
                }
            )
            if console:
                console.print(f"[bold cyan]sweep {name}[/] W&B run {run.id}: {out.state} {out.value} {out.reason}")

    from cxrlab.tracking import wandb_dirs

    with wandb_dirs(sweep_dir):
        wandb.agent(sweep_id, function=trial, count=cfg.n_trials, project=project, entity=entity)
    return rows, [r["trial"] for r in rows]


# ---------------------------------------------------------------------------------------------- main


def _default_train() -> TrainFn:
    try:
        from cxrlab.training.train import train
    except ImportError as e:
        raise SweepError(f"the training stage (cxrlab.training.train) is not available: {e}") from e
    return train


def sweep(cfg: SweepConfig, train_fn: TrainFn | None = None, console: Console | None = None) -> SweepResult:
    """Run (or resume, or join) the sweep described by ``cfg``; returns the table of the whole study.

    ``train_fn(Config) -> RunResult`` runs one trial (default ``cxrlab.training.train.train``); tests inject fakes.
    Safe to run the same command in several processes or on several machines sharing ``--storage``: each
    grid point runs once. Ctrl-C marks the running trial interrupted, writes the summary and re-raises.
    """
    if console is None and cfg.verbose:
        from rich.console import Console

        console = Console(stderr=True)
    spec = parse_sweep_spec(cfg.sweep_file)
    check_param_keys([p.key for p in spec.params])
    name = cfg.name or spec.name or cfg.sweep_file.stem
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise SweepError(f"sweep name '{name}' must be a plain directory name (no slashes); set --name")
    sweep_dir = cfg.out / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runner = _Runner(cfg, spec, name, sweep_dir, train_fn or _default_train())
    if console and spec.ignored:
        console.print(f"[dim]sweep file keys not used by the {cfg.backend} backend: {', '.join(spec.ignored)}[/]")
    params = [p.key for p in spec.searched]

    if cfg.backend == "wandb":
        rows, ran = _run_wandb(cfg, spec, name, sweep_dir, runner, console)
        csv_path, plot = _write_outputs(rows, spec, name, sweep_dir)
        return SweepResult(
            name,
            sweep_dir,
            "wandb",
            "wandb",
            spec.method,
            spec.metric,
            spec.goal,
            params,
            spec.constants,
            rows,
            _best(rows, spec.goal),
            _failed(rows, spec.method),
            ran,
            0,
            0,
            csv_path,
            plot,
            spec.ignored,
        )

    opt = _OptunaSweep(cfg, spec, name, sweep_dir, runner, console)
    if spec.method != "grid":
        opt._sweep_size()  # fail before any trial when the size is unknown
    try:
        opt.run()
    finally:  # also on Ctrl-C: the summary shows what finished
        rows = _trial_rows(opt.trials(), spec)
        csv_path, plot = _write_outputs(rows, spec, name, sweep_dir)
    pending, running = opt.counts()
    freed = apply_retention(rows, _best(rows, spec.goal), runner) if cfg.keep == "best" else 0
    from cxrlab.training.train import disk_usage

    return SweepResult(
        name=name,
        sweep_dir=sweep_dir,
        storage=redact_url(opt.url),
        backend="optuna",
        method=spec.method,
        metric=spec.metric,
        goal=spec.goal,
        params=params,
        constants=spec.constants,
        rows=rows,
        best=_best(rows, spec.goal),
        failed=_failed(rows, spec.method),
        ran_here=opt.ran_here,
        pending=pending,
        running_elsewhere=running,
        summary_csv=csv_path,
        plot_html=plot,
        ignored_keys=spec.ignored,
        disk_bytes=disk_usage(sweep_dir),
        freed_bytes=freed,
    )


__all__ = [
    "Param",
    "SweepConfig",
    "SweepError",
    "SweepResult",
    "SweepSpec",
    "SweepSpecError",
    "check_param_keys",
    "config_keys",
    "flatten_params",
    "parse_sweep_spec",
    "summary_table",
    "sweep",
    "write_parcoords",
    "write_summary_csv",
]
