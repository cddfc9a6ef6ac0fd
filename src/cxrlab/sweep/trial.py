"""One trial: the trial config from the base config and the point, running ``train()``, reading its objective,
recording failures (OOM, NaN, bad parameters) without stopping the sweep."""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import json
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cxrlab.config import (
    Config,
    apply_overrides,
    build_config,
    parse_override,
    read_yaml,
    set_dotted,
)
from cxrlab.data.classes import COSTLY_CLASS
from cxrlab.errors import CxrlabError
from cxrlab.runs import METRICS_FILE
from cxrlab.sweep.spec import RESERVED_KEYS, SweepConfig, SweepError, SweepSpec

if TYPE_CHECKING:
    pass


TrainFn = Callable[[Config], Any]

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
    importances: dict[str, float] | None = None  # fANOVA parameter importances (optuna backend, >= 2 completed)
    importance_note: str = ""
    costly_class: str = COSTLY_CLASS  # the base config's: its recall is shown beside the objective

    @property
    def complete(self) -> bool:
        return self.pending == 0 and self.running_elsewhere == 0


# --------------------------------------------------------------------------------------- the trial


@dataclass
class TrialOutcome:
    state: Literal["COMPLETE", "FAIL", "PRUNED"]
    value: float | None
    metrics: dict[str, float]
    reason: str
    run_dir: str
    duration_s: float
    failure: str = ""  # "error" (hard, not re-run) | "interrupted" (re-run)


def short_error(exc: BaseException, limit: int = 400) -> str:
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


def _is_pruned(exc: BaseException) -> bool:
    try:
        import optuna
    except ImportError:
        return False
    return isinstance(exc, optuna.TrialPruned)


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
_MACHINE_KEYS = (
    "tracking",
    "output_dir",
    "run_name",
    "num_workers",
    "threads",
    "device",
    "devices",
    "cache_images",
    "keep",
)


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


def dict_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each dotted key whose value differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += dict_diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


class TrialRunner:
    """Builds a trial's Config from the base + overrides + parameters and runs ``train_fn`` on it."""

    def __init__(self, cfg: SweepConfig, spec: SweepSpec, name: str, sweep_dir: Path, train_fn: TrainFn):
        self.cfg, self.spec, self.name, self.sweep_dir, self.train_fn = cfg, spec, name, sweep_dir, train_fn
        base = read_yaml(cfg.base_config) if cfg.base_config else {}
        # Trials evaluate on test so the table has test metrics; `--set evaluate=val` turns that off. Trials keep
        # both checkpoints: the sweep's own retention (--keep) decides when the sweep ends.
        defaults = ["evaluate=test", f"tracking.group={name}", "keep=all"]
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

    def accepts(self, keyword: str) -> bool:
        """Whether ``train_fn`` takes ``keyword`` (``resume``, ``callbacks``): a plain ``train_fn(cfg)`` does not,
        and then its trials start from scratch / are not pruned, as before."""
        import inspect

        try:
            sig = inspect.signature(self.train_fn)
        except (TypeError, ValueError):
            return False
        return any(
            p.kind == p.VAR_KEYWORD or (p.name == keyword and p.kind != p.POSITIONAL_ONLY)
            for p in sig.parameters.values()
        )

    def trial_input(self) -> dict[str, Any]:
        """What every trial starts from (the resolved base config after --config, --data and --set, without the
        sweep's own and the per-machine keys; the data as its dataset version when it has one): a resumed or joined
        study must be run with the same."""
        d = self.base_cfg.model_dump(mode="json")
        for k in _MACHINE_KEYS:
            d.pop(k, None)
        if d.get("costly_class") == COSTLY_CLASS:  # reporting only (trains the same): studies from before it match
            d.pop("costly_class")
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

    def __call__(
        self,
        params: dict[str, Any],
        number: int | str,
        *,
        callbacks: list[Any] | None = None,
        resume: Path | None = None,
    ) -> TrialOutcome:
        """Run one trial. ``callbacks`` (e.g. the pruning callback) and ``resume`` (the run directory of an
        interrupted trial with the same parameters, continued from its ``last.ckpt``) are passed to ``train_fn``
        only when given, so a plain ``train_fn(cfg)`` keeps working."""
        t0 = time.perf_counter()
        run_dir = resume or self.runs_dir / self.run_name(number)
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
            kwargs: dict[str, Any] = {}
            if callbacks:
                kwargs["callbacks"] = callbacks
            if resume is not None:
                kwargs["resume"] = resume
            result = self.train_fn(trial_cfg, **kwargs)
        except Exception as e:
            if _is_pruned(e):
                epoch, last = getattr(e, "epoch", None), getattr(e, "value", None)
                reason = f"pruned after epoch {epoch}" + (f" ({metric} = {last:.4g})" if last is not None else "")
                got = {metric: float(last)} if last is not None else {}
                return TrialOutcome("PRUNED", last, got, reason, str(run_dir), time.perf_counter() - t0, "pruned")
            self._log(number, e)
            if _is_oom(e):
                _free_memory()
                return fail(f"out of memory: {short_error(e)}")
            return fail(short_error(e))
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
