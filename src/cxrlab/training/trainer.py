"""Lightning Trainer settings derived from the Config: accelerator, precision (mixed only on GPU),
determinism, the progress bar, and the W&B run config and dataset artifact."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from cxrlab.config import Config

# ----------------------------------------------------------------------------------------------- trainer


def accelerator(cfg: Config) -> str:
    return {"cuda": "gpu"}.get(cfg.device, cfg.device)


def _uses_cuda(cfg: Config) -> bool:
    return torch.cuda.is_available() and cfg.device in ("auto", "gpu", "cuda")


def resolve_precision(cfg: Config) -> str:
    """``auto`` -> 16-bit mixed precision on CUDA, full 32-bit elsewhere.

    CPU bf16 autocast is left to an explicit ``precision: bf16-mixed``: it was ~1.3x faster on this AVX512-BF16 CPU
    (lite0, 192 px) but is emulated, and much slower, on CPUs without bf16 instructions."""
    if cfg.precision == "auto":
        return "16-mixed" if _uses_cuda(cfg) else "32-true"
    return "32-true" if cfg.precision == "32" else cfg.precision


def deterministic_mode(cfg: Config) -> bool | str:
    # Some CUDA backward kernels (adaptive pooling) have no deterministic version: warn there instead of failing.
    if cfg.trainer.deterministic and _uses_cuda(cfg):
        return "warn"
    return cfg.trainer.deterministic


def progress_bar_callbacks(cfg: Config) -> list[Any]:
    if not cfg.trainer.enable_progress_bar:
        return []
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    base = RichProgressBar if sys.stdout.isatty() else TQDMProgressBar

    class Bar(base):  # type: ignore[misc, valid-type]
        def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)  # a logger's version id: noise next to loss and val/f1_macro
            return metrics

    return [Bar(leave=True)] if base is RichProgressBar else [Bar(refresh_rate=10)]


def wandb_run_config(cfg: Config, info: Any, run_id: str) -> dict[str, Any]:
    d = cfg.model_dump(mode="json")
    d.update(run_id=run_id, dataset_version=info.dataset_version, class_names=list(info.classes))
    return d


def use_dataset_artifact(experiment: Any, cfg: Config, info: Any) -> str | None:
    """Record the split's W&B dataset artifact (``data-<name>-split:<dataset_version>``) as this run's input.

    Only online: an offline run cannot look artifacts up, and the dataset version is in its config instead.
    """
    import wandb

    meta_path = info.root / "split.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    names = [meta["wandb_artifact"]] if meta.get("wandb_artifact") else ["data-xray-tiny-split", "data-xray-split"]
    api = wandb.Api()
    entity = cfg.tracking.entity or experiment.entity
    for name in names:
        ref = name if "/" in name else f"{entity}/{cfg.project}/{name}"
        ref = ref if ":" in ref.rsplit("/", 1)[-1] else f"{ref}:{info.dataset_version}"
        try:
            api.artifact(ref, type="dataset")
        except (wandb.errors.CommError, ValueError):  # not logged under this project/version
            continue
        experiment.use_artifact(ref)
        return ref
    return None
