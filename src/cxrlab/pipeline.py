"""The main job: one command from a raw folder of X-rays to an HTML report.

``run_pipeline(RunConfig) -> PipelineResult`` chains the stages, each into its own folder under ``out``::

    out/
      phantoms/            (--demo only) synthetic phantoms, one folder per class
      data/                ingest: manifest.csv, rejects.csv, ingest.json
      split/               split: split.csv, split.json
      audit/               audit: audit.json, audit.html, audit_features.csv (when cxrlab.data.audit exists)
      runs/<run-id>/       train: the run directory; evaluate writes eval-test/, explain writes explain-test/
      report.html          the run's report (training curves, evaluation, calibration, audit, explanations)
      pipeline.json        stages, timings, outputs
      .stages/<stage>.json done-markers

Resumable stage by stage: a stage whose done-marker exists, whose outputs are still there and whose inputs
(its settings plus the fingerprints of the stages before it) are unchanged is not redone. A changed setting
redoes that stage and the ones after it; ``force=[stage]`` does the same on request. An interrupted training
continues from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from cxrlab.analysis.configs import EvalConfig, ExplainConfig
from cxrlab.atomic import write_json
from cxrlab.config import Config, ConfigError, StrictModel, apply_overrides, build_config, field_default, read_yaml
from cxrlab.data.classes import costly_recall_key
from cxrlab.data.configs import AuditConfig, IngestConfig, SplitConfig, SynthConfig
from cxrlab.errors import CxrlabError
from cxrlab.runs import REPORT_FILE, checkpoint_path

STAGES = ("synth", "ingest", "split", "audit", "train", "evaluate", "explain", "report")
MARKER_DIR = ".stages"
PIPELINE_FILE = "pipeline.json"
DEFAULT_CONFIG = Path("configs") / "cpu.yaml"
# training-config keys that do not change what is trained (left out of the train stage's fingerprint)
NOT_TRAINING_KEYS = {"data", "output_dir", "run_name", "threads", "costly_class"}

# The demo's data: plain phantoms (no planted shortcut), enough to learn and to evaluate with sensible CIs.
# Measured with configs/cpu.yaml (efficientnet_lite0, pretrained) on this 2-core machine: 128 px x 6 epochs took
# 5.2 min wall for the whole demo (5.1 min CPU) with test accuracy 1.00 on 45 phantoms; 160 px x 8 epochs (the
# CPU profile's epochs) took 12.0 min (9.5 min CPU) for test F1 0.86 - the phantoms need no more pixels.
DEMO_N_PER_CLASS = 150
DEMO_SIZE = 128
DEMO_EPOCHS = 6


class PipelineError(CxrlabError):
    """The pipeline cannot run; the message names the stage and what to do."""


class RunConfig(StrictModel):
    """Inputs of ``cxrlab run``. Settings a stage has too default to that stage's own default."""

    src: Path | None = Field(None, description="raw data: class folders, Kaggle train/+test/ folder or CSV")
    out: Path = Field(description="output folder of every stage (data/, split/, audit/, runs/<id>/, report)")
    demo: bool = Field(False, description="generate synthetic phantoms as SRC (nothing downloaded)")
    config: Path | None = Field(None, description="training config YAML; default configs/cpu.yaml when present")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides of the training config")
    force: list[str] = Field(default_factory=list, description="stages to redo (with every stage after them)")
    patient_regex: str | None = Field(
        None, description=r"patient id from the file name, e.g. '(person\d+)_' for Kermany names"
    )
    per_class: int | None = Field(None, ge=1, description="balanced subset of N images per class before splitting")
    fractions: tuple[float, float, float] = field_default(SplitConfig, "fractions")
    split_seed: int = field_default(SplitConfig, "seed")
    audit: bool = Field(True, description="run the data audit")
    explain: bool = Field(True, description="run the explanation stage")
    explain_max_images: int | None = Field(300, ge=1, description="cap on explained test images (seeded sample)")
    n_boot: int = Field(
        field_default(EvalConfig, "n_boot"), ge=0, description="bootstrap resamples of the evaluation CIs"
    )
    demo_n_per_class: int = Field(DEMO_N_PER_CLASS, ge=2, description="--demo: phantoms per class")
    demo_size: int = Field(DEMO_SIZE, ge=32, description="--demo: phantom size (and training size)")
    demo_epochs: int = Field(DEMO_EPOCHS, ge=1, description="--demo: training epochs (unless --set epochs=...)")
    demo_seed: int = Field(field_default(SynthConfig, "seed"), description="--demo: seed of the generated phantoms")
    workers: int = Field(field_default(IngestConfig, "workers"), ge=0, description="ingest and audit decoder processes")
    progress: bool = Field(True, description="show progress bars")

    @field_validator("force")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in (*STAGES, "all")]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; valid: {', '.join(STAGES)}, all")
        return v


@dataclass
class StageStatus:
    name: str
    status: str  # done | skipped (up to date) | off
    seconds: float = 0.0
    output: str | None = None
    note: str = ""


@dataclass
class PipelineResult:
    out: Path
    stages: list[StageStatus]
    run_dir: Path | None
    report: Path | None
    headline: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


# --------------------------------------------------------------------------------------------- helpers


def _fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_default_config() -> Path | None:
    """``configs/cpu.yaml`` in the working directory, else beside the source tree (editable install)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = base / DEFAULT_CONFIG
        if p.is_file():
            return p
    return None


class _Stages:
    """Done-markers: ``out/.stages/<name>.json`` = {fingerprint, outputs, seconds, finished}."""

    def __init__(self, out: Path, force: list[str], log: Callable[[str], Any]) -> None:
        self.dir = out / MARKER_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.forced_from = min((STAGES.index(s) for s in force if s in STAGES), default=None)
        if "all" in force:
            self.forced_from = 0
        self.log = log
        self.redone_upstream = False

    def marker(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def fresh(self, name: str, fp: str) -> dict[str, Any] | None:
        """The marker of ``name`` when the stage is done and up to date, else None (and why, logged)."""
        if self.forced_from is not None and STAGES.index(name) >= self.forced_from:
            return None
        m = self.marker(name)
        if not m.is_file():
            return None
        try:
            doc = json.loads(m.read_text())
        except json.JSONDecodeError:
            return None
        if doc.get("fingerprint") != fp:
            self.log(f"[yellow]{name}[/]: inputs changed since the last run; redoing it")
            return None
        paths = [p for p in doc.get("outputs", {}).values() if p and Path(p).is_absolute()]
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            self.log(f"[yellow]{name}[/]: outputs missing ({missing[0]}); redoing it")
            return None
        return doc

    def done(self, name: str, fp: str, outputs: dict[str, Any], seconds: float, **extra: Any) -> dict[str, Any]:
        doc = {
            "stage": name,
            "fingerprint": fp,
            "outputs": {k: str(v) if v is not None else None for k, v in outputs.items()},
            "seconds": round(seconds, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
        }
        write_json(self.marker(name), doc, default=str)
        return doc


def load_train_config(cfg: RunConfig) -> tuple[Config, Path | None]:
    """The training config of the pipeline: --config (default configs/cpu.yaml) + --set overrides.

    ``--demo`` with the default config trains at the phantoms' own size (``img_size = demo_size``: upscaling
    phantoms to the CPU profile's 192 px costs compute and adds nothing) for ``demo_epochs`` epochs, unless
    ``--set img_size=...`` / ``--set epochs=...`` say otherwise, so the whole demo finishes in minutes on 2 cores
    (see DEMO_SIZE). An explicit ``--config`` is used as written.
    """
    path = cfg.config or find_default_config()
    if cfg.config is not None and not cfg.config.is_file():
        raise ConfigError(f"config file not found: {cfg.config}")
    data = read_yaml(path) if path else {}
    if cfg.demo and cfg.config is None:
        given = {o.split("=", 1)[0].strip() for o in cfg.overrides}
        if "img_size" not in given:
            data["img_size"] = [cfg.demo_size, cfg.demo_size]
        if "epochs" not in given:
            data["epochs"] = cfg.demo_epochs
    data = apply_overrides(data, cfg.overrides)
    return build_config(Config, data, source=str(path or "defaults") + (" + --set" if cfg.overrides else "")), path


# --------------------------------------------------------------------------------------------- pipeline


def run_pipeline(cfg: RunConfig, log: Callable[[str], Any] = print) -> PipelineResult:
    """Run (or resume) ingest -> split -> audit -> train -> evaluate -> explain -> report under ``cfg.out``."""
    t_start = time.perf_counter()
    if cfg.demo == (cfg.src is not None):
        raise PipelineError("pass either SRC (a folder of X-rays) or --demo (synthetic phantoms), not both or neither")
    if cfg.src is not None and not cfg.src.exists():
        raise PipelineError(
            f"source {cfg.src} does not exist; pass a folder of class folders, a Kaggle folder or a CSV"
        )
    train_cfg, cfg_path = load_train_config(cfg)  # validate before any work
    out = cfg.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    st = _Stages(out, cfg.force, log)
    statuses: list[StageStatus] = []
    fps: dict[str, str] = {}
    outputs: dict[str, dict[str, Any]] = {}

    def stage(name: str, fp: str, fn: Callable[[], dict[str, Any]], **extra: Any) -> dict[str, Any]:
        fps[name] = fp
        doc = st.fresh(name, fp)
        if doc is not None:
            log(f"[dim]{name}: up to date ({doc.get('finished', '')}), not redone[/]")
            statuses.append(StageStatus(name, "skipped (up to date)", 0.0, _main_output(doc["outputs"])))
            outputs[name] = doc["outputs"]
            return doc["outputs"]
        log(f"[bold]{name}[/] ...")
        t0 = time.perf_counter()
        res = fn()
        secs = time.perf_counter() - t0
        st.done(name, fp, res, secs, **extra)
        statuses.append(StageStatus(name, "done", secs, _main_output(res)))
        outputs[name] = {k: str(v) if v is not None else None for k, v in res.items()}
        log(f"{name}: done in {secs:.1f} s")
        return outputs[name]

    # ---- synth (demo only)
    if cfg.demo:
        src_dir = out / "phantoms"

        def do_synth() -> dict[str, Any]:
            from cxrlab.data.synth import generate

            generate(SynthConfig(out=src_dir, n_per_class=cfg.demo_n_per_class, size=cfg.demo_size, seed=cfg.demo_seed))
            return {"phantoms": src_dir}

        stage("synth", _fingerprint("synth", cfg.demo_n_per_class, cfg.demo_size, cfg.demo_seed), do_synth)
        src: Path = src_dir
    else:
        assert cfg.src is not None
        src = cfg.src.expanduser().resolve()
        statuses.append(StageStatus("synth", "off", 0.0, None, "real data"))
        fps["synth"] = _fingerprint("src", str(src))

    # ---- ingest
    data_dir = out / "data"

    def do_ingest() -> dict[str, Any]:
        from cxrlab.data.ingest import ingest

        r = ingest(
            IngestConfig(
                src=src, out=data_dir, patient_regex=cfg.patient_regex, workers=cfg.workers, progress=cfg.progress
            )
        )
        for w in r.warnings:
            log(f"[yellow]ingest warning:[/] {w}")
        log(f"ingest: {r.n_images} images {r.counts}, {r.n_rejected} rejected")
        return {"manifest": r.manifest_path, "rejects": r.rejects_path, "summary": r.summary_path}

    ing = stage("ingest", _fingerprint("ingest", fps["synth"], str(src), cfg.patient_regex), do_ingest)

    # ---- split
    split_dir = out / "split"

    def do_split() -> dict[str, Any]:
        from cxrlab.data.split import split

        r = split(
            SplitConfig(
                manifest=Path(ing["manifest"]),
                out=split_dir,
                fractions=cfg.fractions,
                seed=cfg.split_seed,
                per_class=cfg.per_class,
                progress=cfg.progress,
            )
        )
        for w in r.warnings:
            log(f"[yellow]split warning:[/] {w}")
        log(f"split: dataset {r.dataset_version}, {r.n_images} images, counts {r.counts}")
        return {"split": r.split_path, "meta": r.meta_path, "dataset_version": r.dataset_version}

    spl = stage("split", _fingerprint("split", fps["ingest"], cfg.fractions, cfg.split_seed, cfg.per_class), do_split)

    # ---- audit (--skip-audit turns it off)
    audit_dir = out / "audit"
    audit_out: dict[str, Any] | None = None
    if not cfg.audit:
        statuses.append(StageStatus("audit", "off", 0.0))
    else:

        def do_audit() -> dict[str, Any]:
            from cxrlab.data.audit import audit

            r = audit(AuditConfig(data=split_dir, out=audit_dir, workers=cfg.workers, progress=cfg.progress))
            for w in r.warnings:
                log(f"[yellow]audit warning:[/] {w}")
            return {"audit": r.json_path, "html": r.html_path, "features": r.features_path}

        audit_out = stage("audit", _fingerprint("audit", fps["split"]), do_audit)

    # ---- train (an interrupted run resumes from its last checkpoint)
    runs_dir = out / "runs"
    tc = train_cfg.model_copy(update={"data": str(split_dir), "output_dir": str(runs_dir)})
    train_fp = _fingerprint("train", fps["split"], tc.model_dump(mode="json", exclude=NOT_TRAINING_KEYS))

    def do_train() -> dict[str, Any]:
        from cxrlab.training.train import train

        started = st.marker("train.started")
        resume = None
        if started.is_file():
            prev = json.loads(started.read_text())
            rd = Path(prev.get("run_dir", ""))
            if prev.get("fingerprint") == train_fp and checkpoint_path(rd, "last").is_file():
                log(f"train: resuming the interrupted run {rd}")
                resume = rd
        if resume is None:
            from cxrlab.training.rundir import new_run_dir

            run_dir, run_id = new_run_dir(tc)
            write_json(started, {"fingerprint": train_fp, "run_dir": str(run_dir)}, indent=None)
            r = train(tc.model_copy(update={"run_name": run_id}))
        else:
            from cxrlab.training.rundir import resume_config

            r = train(resume_config(resume), resume=resume)
        started.unlink(missing_ok=True)
        log(f"train: best epoch {r.best_epoch}, val/f1_macro {r.best_score:.4f}, run {r.run_dir}")
        return {"run_dir": r.run_dir, "bundle": r.bundle_dir}

    tr = stage("train", train_fp, do_train, config=str(cfg_path) if cfg_path else None, overrides=cfg.overrides)
    run_dir = Path(tr["run_dir"])

    # ---- evaluate on the held-out test split
    def do_evaluate() -> dict[str, Any]:
        from cxrlab.analysis.evaluate import evaluate

        r = evaluate(
            EvalConfig(
                target=run_dir, split="test", n_boot=cfg.n_boot, costly_class=tc.costly_class, progress=cfg.progress
            )
        )
        return {"eval_dir": r.out_dir, "metrics": r.paths["metrics"], "report": r.paths.get("report")}

    # the costly class changes the evaluation's headline, not the training (a default one keeps older fingerprints)
    costly = [tc.costly_class] if tc.costly_class != field_default(Config, "costly_class") else []
    ev = stage("evaluate", _fingerprint("evaluate", fps["train"], cfg.n_boot, *costly), do_evaluate)

    # ---- explain (optional)
    if not cfg.explain:
        statuses.append(StageStatus("explain", "off", 0.0))
    else:

        def do_explain() -> dict[str, Any]:
            from cxrlab.analysis.explain import explain

            r = explain(
                ExplainConfig(target=run_dir, split="test", max_images=cfg.explain_max_images, progress=cfg.progress)
            )
            return {"explain_dir": r.out_dir, "html": r.html, "attention": r.attention_json}

        stage("explain", _fingerprint("explain", fps["train"], cfg.explain_max_images), do_explain)

    # ---- report: the run's page, and the same page at out/report.html
    def do_report() -> dict[str, Any]:
        from cxrlab.report.pages import write_run_report

        adir = Path(audit_out["audit"]).parent if audit_out else None
        run_page = write_run_report(run_dir, audit_dir=adir)
        top = write_run_report(run_dir, out=out / REPORT_FILE, audit_dir=adir)
        return {"report": top, "run_report": run_page}

    upstream = [fps.get(s) for s in STAGES if s != "report"]
    rep = stage("report", _fingerprint("report", upstream, cfg.audit, cfg.explain), do_report)

    headline: dict[str, float] = {}
    try:
        doc = json.loads(Path(ev["metrics"]).read_text())
        m = doc.get("metrics", {})
        recall = costly_recall_key(m, costly=doc.get("costly_class") or tc.costly_class)
        for k in ("test/accuracy", "test/f1_macro", recall, "test/ece"):
            if k is not None and m.get(k) is not None:
                headline[k] = float(m[k])
    except (OSError, json.JSONDecodeError):
        pass
    result = PipelineResult(
        out=out,
        stages=statuses,
        run_dir=run_dir,
        report=Path(rep["report"]),
        headline=headline,
        wall_s=time.perf_counter() - t_start,
    )
    write_json(
        out / PIPELINE_FILE,
        {
            "src": str(src),
            "demo": cfg.demo,
            "config": str(cfg_path) if cfg_path else None,
            "overrides": cfg.overrides,
            "dataset_version": spl.get("dataset_version"),
            "run_dir": str(run_dir),
            "audit": str(audit_dir) if audit_out else None,
            "report": str(result.report),
            "headline": headline,
            "stages": [asdict(s) for s in statuses],
            "wall_s": round(result.wall_s, 1),
        },
    )
    return result


def _main_output(outs: dict[str, Any]) -> str | None:
    for v in outs.values():
        if v:
            return str(v)
    return None
