"""LightningModule: a timm classifier, cross-entropy with label smoothing, torchmetrics per epoch.

Logged once per epoch (namespaced, macro-averaged, class names from the data):
``train/loss``, ``train/accuracy``, ``train/f1_macro``, ``train/lr``; ``val/loss``, ``val/accuracy``,
``val/precision_macro``, ``val/recall_macro``, ``val/f1_macro``, ``val/recall_<CLASS>``, ``val/acc_<CLASS>``;
the same under ``test/``. ``acc_<CLASS>`` is one-vs-rest accuracy ((TP+TN)/N for that class);
``recall_<CLASS>`` is TP/(TP+FN), the share of that class found.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassStatScores,
)

from cxrlab.config import Config

STAGES = ("train", "val", "test")


def _metrics(num_classes: int, full: bool) -> MetricCollection:
    m: dict[str, Any] = {
        "accuracy": MulticlassAccuracy(num_classes, average="micro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    }
    if full:
        m["precision_macro"] = MulticlassPrecision(num_classes, average="macro")
        m["recall_macro"] = MulticlassRecall(num_classes, average="macro")
        m["stats"] = MulticlassStatScores(num_classes, average=None)  # per class: tp, fp, tn, fn, support
    return MetricCollection(m)


class CXRClassifier(L.LightningModule):
    """``cfg`` builds the model/optimizer/scheduler; ``class_names`` come from the data.

    ``model`` may be passed in (already built, e.g. to read its data config first); otherwise
    ``cxrlab.training.model.build_model(cfg, len(class_names))`` builds it.
    """

    def __init__(
        self,
        cfg: Config,
        class_names: Sequence[str],
        class_weights: torch.Tensor | None = None,
        model: nn.Module | None = None,
        n_groups: int = 0,
    ) -> None:
        super().__init__()
        from cxrlab.training.model import build_model

        self.cfg = cfg
        self.class_names = list(class_names)
        n = len(self.class_names)
        self.model = model if model is not None else build_model(cfg, n)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)
        self.group_dro = cfg.loss == "groupdro"
        if self.group_dro:
            if n_groups < 1:
                raise ValueError("loss=groupdro needs the number of (source, class) groups of the training split")
            # GroupDRO (Sagawa et al. 2020): a weight per group, raised exponentially with the group's loss; a
            # buffer, so it is saved in checkpoints and a resumed run continues with the same weights
            self.per_sample = nn.CrossEntropyLoss(
                weight=class_weights, label_smoothing=cfg.label_smoothing, reduction="none"
            )
            self.register_buffer("group_q", torch.full((n_groups,), 1.0 / n_groups))
        # ModuleDict keys get a suffix: "train" would clash with nn.Module.train
        self.metrics = nn.ModuleDict({f"{s}_": _metrics(n, full=s != "train") for s in STAGES})
        self.losses = nn.ModuleDict({f"{s}_": MeanMetric() for s in STAGES})

    # ---- model
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    # ---- steps
    def _group_dro_loss(self, logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        per = self.per_sample(logits, y)
        n = self.group_q.numel()
        count = torch.zeros(n, device=per.device).scatter_add_(0, g, torch.ones_like(per))
        group_loss = torch.zeros(n, device=per.device).scatter_add_(0, g, per) / count.clamp(min=1)
        with torch.no_grad():
            seen = count > 0
            q = self.group_q * torch.exp(self.cfg.groupdro_eta * group_loss.detach() * seen)
            self.group_q.copy_(q / q.sum())
        return (self.group_q * group_loss).sum()

    def _step(self, batch: tuple[torch.Tensor, ...], stage: str) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        if self.group_dro and stage == "train" and len(batch) > 2:
            loss = self._group_dro_loss(logits, y, batch[2])
        else:
            loss = self.criterion(logits, y)
        self.losses[f"{stage}_"].update(loss.detach(), weight=y.numel())
        self.metrics[f"{stage}_"].update(logits.detach().float(), y)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            # The global torch RNG (dropout, drop-path) restarts from (seed, epoch, rank) at each epoch's first step,
            # so a resumed run continues the same random stream as an uninterrupted one without an RNG snapshot.
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.current_epoch * 1009 + self.global_rank)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self.log("loss", loss.detach(), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(x).float(), dim=1)

    # ---- epoch ends
    def compute_metrics(self, stage: str) -> dict[str, float]:
        """The stage's epoch metrics as ``{"<stage>/<name>": value}``; resets the accumulators."""
        vals = self.metrics[f"{stage}_"].compute()
        out = {f"{stage}/loss": float(self.losses[f"{stage}_"].compute())}
        stats = vals.pop("stats", None)
        for k, v in vals.items():
            out[f"{stage}/{k}"] = float(v)
        if stats is not None:
            tp, fp, tn, fn = (stats[:, i].double() for i in range(4))
            recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
            acc = (tp + tn) / (tp + fp + tn + fn).clamp(min=1)
            for i, c in enumerate(self.class_names):
                out[f"{stage}/recall_{c}"] = float(recall[i])
                out[f"{stage}/acc_{c}"] = float(acc[i])
        self.metrics[f"{stage}_"].reset()
        self.losses[f"{stage}_"].reset()
        return out

    def _log_epoch(self, stage: str) -> None:
        for k, v in self.compute_metrics(stage).items():
            self.log(k, v, prog_bar=k == "val/f1_macro", on_step=False, on_epoch=True)

    def on_train_epoch_start(self) -> None:
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else self.cfg.learning_rate
        self.log("train/lr", float(lr), on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.metrics["val_"].reset()
            self.losses["val_"].reset()
            return
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # ---- optimisation
    def configure_optimizers(self) -> Any:
        from cxrlab.training.optim import build_optimizer, build_scheduler

        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, -(-total // max(1, self.trainer.max_epochs or 1)))
        optimizer = build_optimizer(self.model, self.cfg, total_steps=total)
        scheduler = build_scheduler(optimizer, self.cfg, steps_per_epoch)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
