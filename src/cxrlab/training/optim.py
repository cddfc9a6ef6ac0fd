"""Optimizer and learning-rate schedule registries: plain dicts from the Config's names to builders.

* ``OPTIMIZERS`` / ``build_optimizer``: AdamW, SGD, RAdam (torch) and Ranger21 (pytorch-optimizer). Weight
  decay is not applied to biases and normalisation weights (timm's ``param_groups_weight_decay``).
* ``SCHEDULERS`` / ``build_scheduler``: None, CosineAnnealingLR, CosineAnnealingWarmRestarts and
  ``CustomCosineAnnealingWarmUpRestarts``, all stepped once per epoch.

Add an optimizer or scheduler: one builder function, one dict entry, its name in ``config.py``'s Literal."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, CosineAnnealingWarmRestarts, LRScheduler

from cxrlab.config import Config, ConfigError

# ===================================================================================== optimizers


def _adamw(params: Iterable[Any], cfg: Config, total_steps: int | None = None) -> Optimizer:
    return torch.optim.AdamW(params, lr=cfg.learning_rate)


def _sgd(params: Iterable[Any], cfg: Config, total_steps: int | None = None) -> Optimizer:
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum)


def _radam(params: Iterable[Any], cfg: Config, total_steps: int | None = None) -> Optimizer:
    return torch.optim.RAdam(params, lr=cfg.learning_rate)


def _ranger21(params: Iterable[Any], cfg: Config, total_steps: int | None = None) -> Optimizer:
    from pytorch_optimizer import Ranger21

    if not total_steps or total_steps < 1:
        raise ConfigError(
            "optimizer Ranger21 needs the total number of optimizer steps for its built-in warm-up/warm-down: "
            "build_optimizer(model, cfg, total_steps=trainer.estimated_stepping_batches)"
        )
    # Ranger21 has its own warm-up + warm-down schedule; with an lr_scheduler configured that one is the
    # only schedule (two schedules on one LR would fight: Ranger21's warm-down ignores group["lr"]).
    return Ranger21(
        params,
        num_iterations=int(total_steps),
        lr=cfg.learning_rate,
        disable_lr_scheduler=cfg.lr_scheduler is not None,
    )


#: optimizer name -> factory(param_groups, cfg, total_steps) (weight decay comes in the param groups)
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "AdamW": _adamw,
    "SGD": _sgd,
    "RAdam": _radam,
    "Ranger21": _ranger21,
}


def build_optimizer(model: nn.Module, cfg: Config, total_steps: int | None = None) -> Optimizer:
    """``cfg.optimizer`` over the trainable parameters of ``model`` at ``cfg.learning_rate``.

    ``cfg.weight_decay`` applies to weights only: biases and normalisation parameters (1-D) get none.
    ``total_steps`` (optimizer steps of the whole run) is required by Ranger21 and ignored by the others.
    """
    factory = OPTIMIZERS.get(cfg.optimizer)
    if factory is None:
        raise ConfigError(f"unknown optimizer '{cfg.optimizer}'; valid: {', '.join(OPTIMIZERS)}")
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay=cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ConfigError("the model has no trainable parameters (is everything frozen?)")
    return factory(groups, cfg, total_steps=total_steps)


# ===================================================================================== schedulers


class CustomCosineAnnealingWarmUpRestarts(LRScheduler):
    """Cosine annealing with warm restarts, a linear warm-up in each cycle and a decaying peak.

    The schedule of the widely used ``CosineAnnealingWarmUpRestarts(optimizer, T_0, T_mult=1, eta_max=0.1,
    T_up=0, gamma=1.)`` (gaussian37's blog): the optimizer's own LR is the floor ``base_lr`` (set it ~0, or
    pass ``eta_min``); cycle ``i`` has length ``T_i`` (``T_0`` first, then ``T_i = (T_i - T_up) * T_mult +
    T_up``: the cosine part grows, the warm-up stays ``T_up``) and peak ``eta_max * gamma**i``. At position
    ``t`` within a cycle::

        t <  T_up:  lr = base_lr + (peak - base_lr) * t / T_up
        t >= T_up:  lr = base_lr + (peak - base_lr) * (1 + cos(pi * (t - T_up) / (T_i - T_up))) / 2

    It is stepped once per epoch (Lightning ``interval="epoch"``); ``t`` counts ``step()`` calls. The LR is
    computed from ``last_epoch`` alone, so ``state_dict()`` / ``load_state_dict()`` resume exactly.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        T_0: int,  # noqa: N803 - the names of the published schedule
        T_mult: int = 1,  # noqa: N803
        eta_max: float = 0.1,
        T_up: int = 0,  # noqa: N803
        gamma: float = 1.0,
        eta_min: float | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(T_0, int) or T_0 < 1:
            raise ValueError(f"T_0 must be a positive integer, got {T_0!r}")
        if not isinstance(T_mult, int) or T_mult < 1:
            raise ValueError(f"T_mult must be an integer >= 1, got {T_mult!r}")
        if not isinstance(T_up, int) or not 0 <= T_up < T_0:
            raise ValueError(f"T_up must be an integer with 0 <= T_up < T_0={T_0}, got {T_up!r}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        self.T_0, self.T_mult, self.T_up, self.gamma = T_0, T_mult, T_up, gamma
        self.base_eta_max = self.eta_max = float(eta_max)
        self.T_i, self.T_cur, self.cycle = T_0, -1, 0
        if eta_min is not None and last_epoch == -1:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def _position(self, epoch: int) -> tuple[int, int, int]:
        """(cycle, t within the cycle, cycle length) of ``epoch``."""
        cycle, t, length = 0, max(epoch, 0), self.T_0
        while t >= length:
            t -= length
            length = (length - self.T_up) * self.T_mult + self.T_up
            cycle += 1
        return cycle, t, length

    def get_lr(self) -> list[float]:  # type: ignore[override]
        self.cycle, self.T_cur, self.T_i = self._position(self.last_epoch)
        self.eta_max = self.base_eta_max * self.gamma**self.cycle
        t, up, length = self.T_cur, self.T_up, self.T_i
        out = []
        for base in self.base_lrs:
            if t < up:
                out.append(base + (self.eta_max - base) * t / up)
            else:
                out.append(base + (self.eta_max - base) * (1 + math.cos(math.pi * (t - up) / (length - up))) / 2)
        return out

    _get_closed_form_lr = get_lr


def _no_scheduler(optimizer: Optimizer, cfg: Config, steps_per_epoch: int) -> None:
    return None


def _cosine(optimizer: Optimizer, cfg: Config, steps_per_epoch: int) -> LRScheduler:
    return CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.scheduler.eta_min)


def _warm_restarts(optimizer: Optimizer, cfg: Config, steps_per_epoch: int) -> LRScheduler:
    s = cfg.scheduler
    return CosineAnnealingWarmRestarts(optimizer, T_0=s.t_0, T_mult=s.t_mult, eta_min=s.eta_min)


def _warm_up_restarts(optimizer: Optimizer, cfg: Config, steps_per_epoch: int) -> LRScheduler:
    s = cfg.scheduler
    eta_max = s.eta_max if s.eta_max is not None else cfg.learning_rate
    if s.t_up >= s.t_0:
        raise ConfigError(f"scheduler.t_up ({s.t_up}) must be smaller than scheduler.t_0 ({s.t_0})")
    if eta_max <= s.eta_min:
        raise ConfigError(f"the peak LR (scheduler.eta_max or learning_rate = {eta_max}) must exceed eta_min")
    return CustomCosineAnnealingWarmUpRestarts(
        optimizer, T_0=s.t_0, T_mult=s.t_mult, eta_max=eta_max, T_up=s.t_up, gamma=s.gamma, eta_min=s.eta_min
    )


#: lr_scheduler name (None = constant LR) -> factory(optimizer, cfg, steps_per_epoch); all step per epoch
SCHEDULERS: dict[str | None, Callable[[Optimizer, Config, int], LRScheduler | None]] = {
    None: _no_scheduler,
    "CosineAnnealingLR": _cosine,
    "CosineAnnealingWarmRestarts": _warm_restarts,
    "CustomCosineAnnealingWarmUpRestarts": _warm_up_restarts,
}


def build_scheduler(optimizer: Optimizer, cfg: Config, steps_per_epoch: int) -> dict[str, Any] | None:
    """Lightning's lr-scheduler config for ``cfg.lr_scheduler`` (None when there is none).

    Every schedule steps once per epoch (``interval="epoch"``): ``CosineAnnealingLR`` over ``cfg.epochs``,
    the restart schedules with cycles of ``scheduler.t_0`` epochs. ``steps_per_epoch`` is accepted for
    per-step schedules; the current ones do not need it.
    """
    factory = SCHEDULERS.get(cfg.lr_scheduler)
    if factory is None:
        valid = ", ".join(str(k) for k in SCHEDULERS)
        raise ConfigError(f"unknown lr_scheduler '{cfg.lr_scheduler}'; valid: {valid}")
    scheduler = factory(optimizer, cfg, steps_per_epoch)
    if scheduler is None:
        return None
    return {"scheduler": scheduler, "interval": "epoch", "frequency": 1, "name": "lr"}
