"""Leave-source-out validation (``cxrlab validate``): will the model work on a source it has never seen?

``validate(ValidateConfig) -> ValidateResult`` holds out one group of sources at a time (default: every source
alone): the images of the group go to the ``external`` split (``data split --holdout-source``), a model is trained
on the rest as ``train`` would, and evaluated on its own in-distribution test split and on the unseen sources.
Each fold's row puts the two side by side (accuracy, macro-F1, per-class recall, each with its bootstrap CI); the
pooled row concatenates every fold's predictions (each held-out image once when the groups do not overlap)::

    out/
      folds/<group>/split/          split.csv with the group's images in 'external'
      folds/<group>/model/          the fold's run directory (eval-test/ and eval-external/ inside)
      folds/<group>/fold.json       done-marker: fingerprint of the inputs + the fold's row
      validate.json  validate.csv   every fold, the pooled rows
      validate.html                 the table, with what it means

Resumable like ``run``: a fold whose done-marker matches its inputs (manifest content, training config, group,
fractions, seed, bootstrap) is not redone; an interrupted training continues from its last checkpoint; a fold
whose inputs changed is redone from scratch. A group whose removal leaves a class without training images is
skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlab.analysis.configs import ValidateConfig
from cxrlab.atomic import json_safe, write_json
from cxrlab.config import ConfigError
from cxrlab.data.manifest import EXTERNAL_SPLIT, MANIFEST_FILE, DataError, has_sources, read_manifest
from cxrlab.errors import CxrlabError
from cxrlab.runs import BUNDLE_DIR, META_FILE, SUMMARY_FILE, checkpoint_path

FOLD_FILE = "fold.json"
STARTED_FILE = "started.json"
RUN_NAME = "model"


class ValidateError(CxrlabError):
    """Leave-source-out validation cannot run; the message says what to change."""


@dataclass
class ValidateResult:
    out: Path
    rows: pd.DataFrame  # one row per fold plus "pooled"
    classes: list[str]
    folds: list[dict[str, Any]]  # fold.json documents (status done | skipped)
    paths: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0


def _slug(names: list[str]) -> str:
    return re.sub(r"[^0-9A-Za-z._-]+", "_", "+".join(names)) or "group"


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _manifest_digest(df: pd.DataFrame) -> str:
    cols = [c for c in ("sha256", "path", "label", "source", "patient_id") if c in df.columns]
    return hashlib.sha256(pd.util.hash_pandas_object(df[cols], index=False).to_numpy().tobytes()).hexdigest()[:16]


def _row_metrics(doc: dict[str, Any], classes: list[str], side: str) -> dict[str, Any]:
    """The fold row's columns of one evaluation (metrics.json): n, accuracy, macro-F1 and recall per class."""
    p = doc["prefix"]
    m, ci = doc["metrics"], doc["ci"]
    row: dict[str, Any] = {f"{side}_n": doc["n"]}
    for name in ("accuracy", "f1_macro"):
        row[f"{side}_{name}"] = m.get(f"{p}/{name}")
        row[f"{side}_{name}_lo"], row[f"{side}_{name}_hi"] = (ci.get(f"{p}/{name}") or [None, None])[:2]
    for c in classes:
        if f"{p}/recall_{c}" in m:
            row[f"{side}_recall_{c}"] = m[f"{p}/recall_{c}"]
            row[f"{side}_recall_{c}_lo"], row[f"{side}_recall_{c}_hi"] = (ci.get(f"{p}/recall_{c}") or [None, None])[:2]
    row[f"{side}_warnings"] = len(doc.get("warnings") or [])
    return row


def _pooled(preds: list[pd.DataFrame], classes: list[str], side: str, cfg: ValidateConfig) -> dict[str, Any]:
    from cxrlab.analysis.metrics import compute_metrics

    df = pd.concat(preds, ignore_index=True)
    cidx = {c: i for i, c in enumerate(classes)}
    probs = df[[f"p_{c}" for c in classes]].to_numpy(float)
    y = df["label"].map(cidx).to_numpy()
    r = compute_metrics(y, probs, classes, "pooled", cfg.n_boot, cfg.split_seed, cfg.ci_level)
    doc = {"prefix": "pooled", "n": len(df), "metrics": r["metrics"], "ci": {k: list(v) for k, v in r["ci"].items()}}
    return _row_metrics(doc, classes, side)


def validate(cfg: ValidateConfig, log: Callable[[str], Any] = print) -> ValidateResult:
    """Train and evaluate one model per held-out source group (see the module doc); resumable."""
    from cxrlab.analysis.evaluate import EvalConfig, evaluate
    from cxrlab.pipeline import RunConfig, load_train_config

    t0 = time.perf_counter()
    mpath = Path(cfg.manifest)
    df = read_manifest(mpath)
    if not has_sources(df):
        raise ValidateError(
            f"{mpath} records no source per image; ingest with sources (SOURCES.csv, --source-regex, or several "
            "roots: `cxrlab data ingest ROOT1 ROOT2 --out DIR`)"
        )
    sources = sorted(df["source"].astype(str).unique())
    groups = [list(dict.fromkeys(g)) for g in cfg.groups] or [[s] for s in sources]
    unknown = sorted({s for g in groups for s in g} - set(sources))
    if unknown:
        raise ValidateError(f"held-out source(s) {unknown} are not in {mpath}; its sources are: {', '.join(sources)}")
    if len(sources) < 2:
        raise ValidateError(f"{mpath} has one source ({sources[0]}): nothing to hold out")
    train_cfg, cfg_path = load_train_config(RunConfig(out=cfg.out, config=cfg.config, overrides=cfg.overrides))
    classes = sorted(df["label"].astype(str).unique())
    out = Path(cfg.out).expanduser().resolve()
    digest = _manifest_digest(df)
    train_fp = train_cfg.model_dump(mode="json", exclude={"data", "output_dir", "run_name", "threads", "costly_class"})

    folds: list[dict[str, Any]] = []
    for group in groups:
        name = _slug(group)
        fdir = out / "folds" / name
        fp = _fingerprint(digest, group, cfg.fractions, cfg.split_seed, cfg.n_boot, cfg.ci_level, train_fp)
        done = _read(fdir / FOLD_FILE)
        if done.get("fingerprint") == fp:
            log(f"[dim]fold {name}: up to date, not redone[/]")
            folds.append(done)
            continue
        started = _read(fdir / STARTED_FILE)
        if fdir.exists() and started.get("fingerprint") != fp:
            shutil.rmtree(fdir)  # inputs changed (or an unknown leftover): this fold starts afresh
        fdir.mkdir(parents=True, exist_ok=True)
        write_json(fdir / STARTED_FILE, {"fingerprint": fp, "held_out": group})
        log(f"[bold]fold {name}[/]: holding out {', '.join(group)}")
        doc: dict[str, Any] = {"fold": name, "held_out": group, "fingerprint": fp}
        try:
            _split(cfg, mpath, fdir, group)
        except DataError as e:
            doc.update(status="skipped", reason=str(e))
            log(f"[yellow]fold {name} skipped:[/] {e}")
            write_json(fdir / FOLD_FILE, doc)
            folds.append(doc)
            continue
        run_dir = _train(train_cfg, fdir, log)
        evals = {}
        for side, split in (("test", "test"), ("external", EXTERNAL_SPLIT)):
            e = evaluate(
                EvalConfig(
                    target=run_dir,
                    split=split,
                    n_boot=cfg.n_boot,
                    seed=cfg.split_seed,
                    ci_level=cfg.ci_level,
                    progress=cfg.progress,
                    wandb="off",
                )
            )
            evals[side] = e
        row = {"fold": name, "held_out": ", ".join(group)}
        for side, e in evals.items():
            row.update(_row_metrics(json.loads(e.paths["metrics"].read_text()), classes, side))
        doc.update(
            status="done",
            run_dir=str(run_dir),
            row=row,
            predictions={side: str(e.paths["predictions"]) for side, e in evals.items()},
            warnings={side: e.warnings for side, e in evals.items()},
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        write_json(fdir / FOLD_FILE, json_safe(doc))
        folds.append(doc)
        log(f"fold {name}: done")

    done = [f for f in folds if f["status"] == "done"]
    rows = [f["row"] for f in done]
    if done:
        pooled: dict[str, Any] = {"fold": "pooled", "held_out": "every fold's held-out sources"}
        for side in ("test", "external"):
            preds = [pd.read_csv(f["predictions"][side], keep_default_na=False) for f in done]
            pooled.update(_pooled(preds, classes, side, cfg))
        rows.append(pooled)
    table = pd.DataFrame(rows)
    res = ValidateResult(out=out, rows=table, classes=classes, folds=folds, wall_s=time.perf_counter() - t0)
    res.paths["csv"] = out / "validate.csv"
    table.to_csv(res.paths["csv"], index=False, float_format="%.6g")
    res.paths["json"] = out / "validate.json"
    write_json(
        res.paths["json"],
        json_safe(
            {
                "manifest": str(mpath),
                "config": str(cfg_path) if cfg_path else None,
                "overrides": cfg.overrides,
                "classes": classes,
                "sources": sources,
                "groups": groups,
                "folds": folds,
                "rows": table.to_dict(orient="records"),
                "ci_method": f"percentile bootstrap, {cfg.n_boot} resamples, seed {cfg.split_seed}",
                "wall_s": round(res.wall_s, 1),
            }
        ),
    )
    res.paths["html"] = _write_html(res, out / "validate.html")
    return res


def _read(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _split(cfg: ValidateConfig, manifest: Path, fdir: Path, group: list[str]) -> Path:
    from cxrlab.data.split import SplitConfig, split

    m = manifest if manifest.is_file() or not (manifest / MANIFEST_FILE).is_file() else manifest / MANIFEST_FILE
    split(
        SplitConfig(
            manifest=m,
            out=fdir / "split",
            fractions=cfg.fractions,
            seed=cfg.split_seed,
            holdout_sources=tuple(group),
            progress=cfg.progress,
        )
    )
    return fdir / "split"


def _train(train_cfg: Any, fdir: Path, log: Callable[[str], Any]) -> Path:
    """The fold's trained run directory: reused when finished, resumed when interrupted, else trained."""
    from cxrlab.training.rundir import resume_config
    from cxrlab.training.train import train

    run_dir = fdir / RUN_NAME
    if (run_dir / SUMMARY_FILE).is_file() and (run_dir / BUNDLE_DIR / META_FILE).is_file():
        return run_dir
    if checkpoint_path(run_dir).is_file():
        log(f"resuming the interrupted training in {run_dir}")
        return train(resume_config(run_dir), resume=run_dir).run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # started but left no checkpoint: nothing to resume
    cfg = train_cfg.model_copy(
        update={"data": str(fdir / "split"), "output_dir": str(fdir), "run_name": RUN_NAME, "evaluate": "test"}
    )
    if cfg.data is None:
        raise ConfigError("no split to train on")
    return train(cfg).run_dir


def _fmt(v: Any, lo: Any = None, hi: Any = None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    s = f"{v:.3f}"
    if lo is not None and hi is not None and all(isinstance(x, int | float) and math.isfinite(x) for x in (lo, hi)):
        s += f" [{lo:.2f}, {hi:.2f}]"
    return s


def table_cells(row: dict[str, Any], classes: list[str]) -> list[str]:
    """A fold row as display cells: held out, then test and external n / accuracy / macro-F1 / recall per class."""

    def g(k: str) -> Any:
        v = row.get(k)
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else v

    cells = [str(row["fold"])]
    for side in ("test", "external"):
        cells.append(str(int(g(f"{side}_n") or 0)))
        for name in ("accuracy", "f1_macro"):
            cells.append(_fmt(g(f"{side}_{name}"), g(f"{side}_{name}_lo"), g(f"{side}_{name}_hi")))
        cells.append(
            "; ".join(
                f"{c} {_fmt(g(f'{side}_recall_{c}'), g(f'{side}_recall_{c}_lo'), g(f'{side}_recall_{c}_hi'))}"
                for c in classes
                if g(f"{side}_recall_{c}") is not None
            )
        )
    return cells


TABLE_COLUMNS = [
    "held out",
    "test n",
    "test accuracy",
    "test macro-F1",
    "test recall",
    "held-out n",
    "held-out accuracy",
    "held-out macro-F1",
    "held-out recall",
]


def _write_html(res: ValidateResult, path: Path) -> Path:
    from cxrlab.report import html as rh

    rows = [table_cells(r, res.classes) for r in res.rows.to_dict(orient="records")]
    parts = [
        rh.paragraph(
            "One model per held-out source group, trained on the other sources. 'test' is the model's own "
            "in-distribution test split (sources it was trained on); 'held-out' is every image of the sources it "
            "never saw. A large drop from test to held-out means the model learned something about its sources "
            "that does not carry over: what a reviewer or another hospital would find. Macro-F1 on held-out data "
            "averages only the classes those sources hold (one class: read its recall). 95% percentile bootstrap "
            "intervals in brackets."
        ),
        rh.table(rows, columns=TABLE_COLUMNS),
    ]
    skipped = [f for f in res.folds if f["status"] == "skipped"]
    for f in skipped:
        parts.append(rh.callout(f"fold {f['fold']} skipped: {f['reason']}", "warn"))
    for f in res.folds:
        for side, ws in (f.get("warnings") or {}).items():
            for w in ws:
                parts.append(rh.callout(f"fold {f['fold']}, {side}: {w}", "error", "Shift:"))
    return rh.write_page(path, rh.page("Leave-source-out validation", parts, subtitle=str(res.out)))
