"""``train(cfg) -> RunResult``: Lightning + timm on a split, a local run directory, optional W&B.

Run directory ``<output_dir>/<run-id>/``::

    config.yaml          the resolved config (num_classes and data from the split)
    metrics.csv          one row per epoch: epoch, step, train/..., val/... (namespaced, macro-averaged)
    checkpoints/         best.ckpt (max val/f1_macro, the seed's rule) and last.ckpt (for --resume); when the
                         run finishes, ``keep`` decides what stays: last.ckpt only (default), nothing, or both
    bundle/              the best model as safetensors + bundle.json (what evaluate/predict/serve load)
    summary.json         run id, best epoch, metrics, data, dataset version, class names, timing
    wandb/               the W&B run (offline: sync later with ``wandb sync``), when tracking is on

``train(cfg, resume="runs/<id>")`` continues an interrupted run in the same directory from ``last.ckpt``: model,
optimizer, scheduler, loop and callback state come from the checkpoint, and the data order, augmentation and
dropout streams are functions of ``(seed, epoch)`` (see ``cxrlab.data.datamodule`` and ``CXRClassifier``), so the
resumed run sees the batches the uninterrupted run would have seen.

Checkpoints are read by ``cxrlab.inference.bundle.read_checkpoint`` (``weights_only=True``: no pickle code
execution): Lightning's checkpoints of this module hold only tensors and plain containers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import signal
import string
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cxrlab.atomic import write_json
from cxrlab.config import Config, ConfigError, dump_config
from cxrlab.data.classes import resolve_costly_class
from cxrlab.errors import RunError
from cxrlab.runs import (
    BUNDLE_DIR,
    CKPT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    WANDB_FILE,
    WEIGHTS_FILE,
    checkpoint_path,
    read_metrics,
    read_summary,
)
from cxrlab.training.rundir import (
    apply_keep,
    check_resume_compatible,
    disk_usage,
    epoch_csv_logger,
    locate_resume,
    new_run_dir,
    resume_checkpoint,
    safe_name,
)
from cxrlab.training.trainer import (
    accelerator,
    deterministic_mode,
    progress_bar_callbacks,
    resolve_precision,
    use_dataset_artifact,
    wandb_run_config,
)

log = logging.getLogger(__name__)

MONITOR = "val/f1_macro"
_DDP_RUN_DIR = "CXRLAB_DDP_RUN_DIR"


@dataclass
class RunResult:
    run_dir: Path
    run_id: str
    bundle_dir: Path
    best_epoch: int  # 0-based, as Lightning and metrics.csv number epochs
    best_score: float  # val/f1_macro of the best epoch
    metrics: dict[str, float]  # val/... of the best epoch, plus test/... when cfg.evaluate == "test"
    epochs_run: int  # epochs completed (across resumes)
    wandb_dir: Path | None = None  # the W&B run directory (offline-run-... / run-...)
    wandb_mode: str = "disabled"
    dataset_version: str = ""
    class_names: list[str] = field(default_factory=list)
    data: str = ""
    wall_s: float = 0.0
    skipped_images: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the user should know (also printed by the CLI)
    disk_bytes: int = 0  # size of the run directory when the run finished

    @property
    def wandb_sync(self) -> str | None:
        """``wandb sync DIR`` for an offline run, else None."""
        return f"wandb sync {self.wandb_dir}" if self.wandb_dir and self.wandb_mode == "offline" else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("run_dir", "bundle_dir", "wandb_dir"):
            d[k] = str(d[k]) if d[k] is not None else None
        return d


# --------------------------------------------------------------------------------------------------- train


def train(
    cfg: Config,
    resume: str | Path | None = None,
    *,
    callbacks: Sequence[Any] | None = None,
) -> RunResult:
    """Train ``cfg`` on the split ``cfg.data``; write the run directory; return where everything is.

    ``resume``: a run directory (or a checkpoint inside one) to continue from its ``last.ckpt``; ``cfg`` should be
    its stored config (``resume_config``), possibly with more epochs. ``callbacks``: extra Lightning callbacks
    (e.g. a sweep's pruning callback).
    """
    import lightning as L

    from cxrlab.data.datamodule import CXRDataModule, check_split, resolve_split
    from cxrlab.tracking import resolve_wandb_mode, wandb_dirs
    from cxrlab.training.model import build_model, model_data_config
    from cxrlab.training.module import CXRClassifier

    t0 = time.perf_counter()
    info = resolve_split(cfg.data)
    check_split(info, cfg.evaluate)  # before any directory is made: bad data leaves nothing behind
    if cfg.num_classes is not None and cfg.num_classes != len(info.classes):
        raise ConfigError(
            f"num_classes={cfg.num_classes} but the data has {len(info.classes)} classes {info.classes}; "
            "remove num_classes from the config (it is taken from the data)"
        )
    # the costly class as the data spells it (a name the user set that matches no class fails here, before any work)
    costly = resolve_costly_class(info.classes, cfg.costly_class)
    update = {"num_classes": len(info.classes), "data": str(info.root)} | ({"costly_class": costly} if costly else {})
    cfg = cfg.model_copy(update=update)

    from cxrlab.training.model import check_model_name

    check_model_name(cfg.model_name)  # before the run directory exists: a typo leaves nothing behind
    notes: list[str] = []
    ckpt_path: Path | None = None
    new_run = False
    if resume is not None:
        run_dir, ckpt_path = locate_resume(resume)
        ckpt_path, note = resume_checkpoint(run_dir, ckpt_path, explicit=Path(resume).expanduser().is_file())
        notes += [note] if note else []
        run_id = run_dir.name
        check_resume_compatible(cfg, run_dir)
        cfg = cfg.model_copy(update={"run_name": run_id, "output_dir": str(run_dir.parent)})
    elif _DDP_RUN_DIR in os.environ and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        # a DDP worker re-launched by Lightning's subprocess launcher: join rank 0's run directory
        run_dir = Path(os.environ[_DDP_RUN_DIR])
        run_id = run_dir.name
        cfg = cfg.model_copy(update={"run_name": run_id})
    else:
        run_dir, run_id = new_run_dir(cfg)
        new_run = True
        cfg = cfg.model_copy(update={"run_name": run_id})
        os.environ[_DDP_RUN_DIR] = str(run_dir)  # inherited by DDP workers started inside trainer.fit
    dump_config(cfg, run_dir / CONFIG_FILE)

    prev_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mode = resolve_wandb_mode(cfg.tracking.wandb)
    try:
        wandb_env = wandb_dirs(run_dir) if mode != "disabled" else nullcontext()
        with wandb_env, warnings.catch_warnings(), _quiet_lightning():
            # On 2 cores the main-process loader (num_workers=0) is the right choice; Lightning's hint says otherwise.
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
            # We log per epoch only, so the step-logging interval does not matter.
            warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")  # lightning vs torch 2.14
            if cfg.fine_tune:  # the frozen backbone's BatchNorm layers are in eval mode on purpose
                warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
            L.seed_everything(cfg.seed, workers=True, verbose=False)
            try:
                model = build_model(cfg, len(info.classes))
                mean, std = model_data_config(model)
                dm = CXRDataModule(cfg, info, mean, std)
                weights = dm.class_weights() if cfg.imbalance == "loss" else None
                n_groups = len(dm.group_names()) if cfg.loss == "groupdro" else 0
                module = CXRClassifier(cfg, info.classes, class_weights=weights, model=model, n_groups=n_groups)
            except BaseException:
                if new_run:
                    _remove_if_only_config(run_dir)  # nothing was trained: leave no orphan run directory
                raise
            result = _fit_and_finish(cfg, info, dm, module, run_dir, run_id, ckpt_path, mode, callbacks or [])
            result.warnings[:0] = notes
    finally:
        torch.set_num_threads(prev_threads)
        if os.environ.get(_DDP_RUN_DIR) == str(run_dir) and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            os.environ.pop(_DDP_RUN_DIR, None)
    result.wall_s = round(time.perf_counter() - t0, 1)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        apply_keep(run_dir, cfg.keep)
    result.disk_bytes = disk_usage(run_dir)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        _write_summary(result, cfg)
    return result


def _remove_if_only_config(run_dir: Path) -> None:
    """Delete a run directory that holds nothing but its config.yaml (a run that failed before training)."""
    import shutil

    try:
        if {p.name for p in run_dir.iterdir()} <= {CONFIG_FILE}:
            shutil.rmtree(run_dir)
    except OSError:
        pass


def _absent_class_metrics(info: Any, metrics: dict[str, float]) -> list[str]:
    """Drop the per-class metrics of classes with no images in the val/test split (their recall is undefined, not
    0.0) and return one warning per split that lacks classes."""
    table = info.table
    notes: list[str] = []
    for split in ("val", "test"):
        if not any(k.startswith(f"{split}/") for k in metrics):
            continue
        present = set(table.loc[table["split"] == split, "label"])
        absent = [c for c in info.classes if c not in present]
        if not absent:
            continue
        for c in absent:
            for name in ("recall", "acc"):
                metrics.pop(f"{split}/{name}_{c}", None)
        notes.append(
            f"class {', '.join(absent)} has no images in the {split} split: {split}/recall_<class> is undefined for it "
            f"(not reported; it is not 0.0) and the {split} macro averages count it as 0. Re-split so that every "
            f"class is in {split} (cxrlab data split), or read `cxrlab evaluate`, which reports it as absent"
        )
    for n in notes:
        log.warning(n)
    return notes


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (accelerator banner, tips, limit_* echoes) off for the run; warnings stay."""
    lg = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    old = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(old)


def _fit_and_finish(
    cfg: Config,
    info: Any,
    dm: Any,
    module: Any,
    run_dir: Path,
    run_id: str,
    ckpt_path: Path | None,
    mode: str,
    extra_callbacks: Sequence[Any],
) -> RunResult:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    ckpt_dir = run_dir / CKPT_DIR
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=MONITOR,
        mode="max",
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    callbacks: list[Any] = [checkpoint, *progress_bar_callbacks(cfg), *extra_callbacks]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.early_stopping_patience))

    loggers: list[Any] = [epoch_csv_logger(run_dir / METRICS_FILE)]
    wandb_logger = None
    if mode != "disabled":
        wandb_logger = _make_wandb_logger(cfg, info, run_dir, run_id, mode, resumed=ckpt_path is not None)
        loggers.append(wandb_logger)

    trainer = L.Trainer(
        accelerator=accelerator(cfg),
        devices=cfg.devices,
        precision=resolve_precision(cfg),
        max_epochs=cfg.epochs,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        deterministic=deterministic_mode(cfg),
        limit_train_batches=cfg.trainer.limit_train_batches,
        limit_val_batches=cfg.trainer.limit_val_batches,
        limit_test_batches=cfg.trainer.limit_test_batches,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=callbacks,
        use_distributed_sampler=False,  # EpochSampler shards the training set itself (see cxrlab.data.datamodule)
    )
    wandb_dir: Path | None = None
    ok = False
    try:
        if wandb_logger is not None and trainer.is_global_zero:
            experiment = wandb_logger.experiment
            wandb_dir = Path(experiment.dir).parent
            if mode == "online":
                try:
                    use_dataset_artifact(experiment, cfg, info)
                except Exception as e:  # noqa: BLE001 — optional lookup on a remote service; never fail a run on it
                    log.warning("could not record the dataset artifact: %s", e)
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
        except SystemExit as e:
            # Lightning turns Ctrl+C into sys.exit(1) (and leaves SIGINT ignored) and SIGTERM into SIGTERMException
            # (exit code 0): report it as the interruption it is, with the way back.
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.default_int_handler)
            log.warning("training interrupted; continue with: cxrlab train --resume %s", run_dir)
            raise KeyboardInterrupt(f"training interrupted; resume with `cxrlab train --resume {run_dir}`") from e
        result = _finish(cfg, info, dm, module, trainer, checkpoint, run_dir, run_id, wandb_logger)
        result.wandb_dir, result.wandb_mode = wandb_dir, mode
        ok = True
        return result
    finally:
        if wandb_logger is not None and trainer.is_global_zero:
            import wandb

            if wandb.run is not None:
                wandb.run.finish(exit_code=0 if ok else 1)


def _make_wandb_logger(cfg: Config, info: Any, run_dir: Path, run_id: str, mode: str, resumed: bool) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    id_file = run_dir / WANDB_FILE
    wandb_id = None
    if resumed and id_file.is_file():
        wandb_id = json.loads(id_file.read_text()).get("id")
    wandb_id = wandb_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    write_json(id_file, {"id": wandb_id, "mode": mode}, indent=None)
    return WandbLogger(
        project=cfg.project,
        entity=cfg.tracking.entity,
        group=cfg.tracking.group,
        tags=list(cfg.tracking.tags) or None,
        name=run_id,
        id=wandb_id,
        resume="allow",
        save_dir=str(run_dir),
        mode=mode,
        job_type="train",
        config=wandb_run_config(cfg, info, run_id),
        log_model=False,  # the best bundle is logged once at the end (best only: sweeps must not fill the disk)
    )


def _finish(
    cfg: Config,
    info: Any,
    dm: Any,
    module: Any,
    trainer: Any,
    checkpoint: Any,
    run_dir: Path,
    run_id: str,
    wandb_logger: Any,
) -> RunResult:
    from cxrlab.inference.bundle import BundleMeta, read_checkpoint, save_bundle

    best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else checkpoint_path(run_dir, "best")
    if best.is_file():
        state = read_checkpoint(best, lightning=True)
        module.load_state_dict(state["state_dict"])
        best_epoch = int(state["epoch"])
    elif (run_dir / BUNDLE_DIR / WEIGHTS_FILE).is_file() and (
        earlier := read_summary(run_dir).get("best_epoch")
    ) is not None:
        # A resumed run whose best.ckpt the `keep` setting deleted, and no better epoch since: the best weights
        # are the bundle's.
        from cxrlab.inference.bundle import read_state_dict

        module.model.load_state_dict(read_state_dict(run_dir / BUNDLE_DIR / WEIGHTS_FILE, error=RunError))
        best_epoch = int(earlier)
    else:
        raise RunError(
            f"no best checkpoint in {run_dir / CKPT_DIR}: validation never ran (check trainer.limit_val_batches)"
        )

    rows = {int(r["epoch"]): r for r in read_metrics(run_dir)}
    best_row = rows.get(best_epoch, {})
    metrics = {k: float(v) for k, v in best_row.items() if k.startswith("val/")}
    best_score = float(metrics.get(MONITOR, float("nan")))
    if math.isnan(best_score) and checkpoint.best_model_score is not None:
        best_score = float(checkpoint.best_model_score)

    if cfg.evaluate == "test":
        out = trainer.test(module, datamodule=dm, verbose=False)
        metrics.update({k: float(v) for k, v in (out[0] if out else {}).items() if k.startswith("test/")})

    notes = _absent_class_metrics(info, metrics)
    shift_meta, shift_arrays = {}, None
    if cfg.shift_stats and trainer.is_global_zero:
        from cxrlab.analysis.shift_fit import fit_from_datamodule

        shift_meta, shift_arrays = fit_from_datamodule(
            module.model, dm, next(module.model.parameters()).device, seed=cfg.seed
        )
    mean, std = dm.mean, dm.std
    meta = BundleMeta(
        model_name=cfg.model_name,
        class_names=list(info.classes),
        img_size=tuple(cfg.img_size),
        in_chans=cfg.in_chans,
        mean=tuple(mean),
        std=tuple(std),
        preprocess=cfg.preprocess.model_dump(),
        dataset_version=info.dataset_version,
        metrics=dict(metrics),
        config=cfg.model_dump(mode="json"),
        run_id=run_id,
        shift=shift_meta,
    )
    bundle_dir = run_dir / BUNDLE_DIR
    if trainer.is_global_zero:
        save_bundle(module.model, meta, bundle_dir)
        if shift_arrays is not None:
            from cxrlab.analysis.shift_fit import save_statistics

            save_statistics(bundle_dir, shift_meta, shift_arrays)
        if wandb_logger is not None and cfg.tracking.log_model:
            _log_model_artifact(wandb_logger.experiment, bundle_dir, run_id, best_epoch, metrics, info)
        if wandb_logger is not None:
            wandb_logger.experiment.summary.update(
                {"best_epoch": best_epoch, **{f"best/{k}": v for k, v in metrics.items()}}
            )

    return RunResult(
        run_dir=run_dir,
        run_id=run_id,
        bundle_dir=bundle_dir,
        best_epoch=best_epoch,
        best_score=best_score,
        metrics=metrics,
        epochs_run=int(trainer.current_epoch),
        dataset_version=info.dataset_version,
        class_names=list(info.classes),
        data=str(info.root),
        skipped_images=dict(dm.skipped),
        warnings=notes,
    )


def _log_model_artifact(
    experiment: Any, bundle_dir: Path, run_id: str, best_epoch: int, metrics: dict[str, float], info: Any
) -> None:
    import wandb

    art = wandb.Artifact(
        f"model-{safe_name(run_id)}",
        type="model",
        description=f"best model bundle of run {run_id} (epoch {best_epoch}, by {MONITOR})",
        metadata={"best_epoch": best_epoch, "dataset_version": info.dataset_version, **metrics},
    )
    # immutable: W&B references the bundle's files instead of staging a copy of them (a second copy of the
    # weights per run; the bundle is final once written); skip_cache: nor a third in W&B's cache
    art.add_dir(str(bundle_dir), policy="immutable", skip_cache=True)
    experiment.log_artifact(art, aliases=["best", "latest"])


def _write_summary(result: RunResult, cfg: Config) -> None:
    d = result.to_json()
    d["wandb_sync"] = result.wandb_sync
    d["model_name"] = cfg.model_name
    d["evaluate"] = cfg.evaluate
    write_json(result.run_dir / SUMMARY_FILE, d)
