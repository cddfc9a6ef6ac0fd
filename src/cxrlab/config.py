"""Typed configuration for every stage.

All configs are pydantic models with ``extra="forbid"``: a misspelt key fails with the key and the valid
names instead of being silently ignored. ``load_config(path, overrides)`` reads YAML and applies
``key=value`` overrides with dotted paths (``augment.hflip_p=0``, ``trainer.limit_train_batches=2``).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxrlab.data.classes import COSTLY_CLASS
from cxrlab.errors import CxrlabError

M = TypeVar("M", bound=BaseModel)

OptimizerName = Literal["AdamW", "SGD", "RAdam", "Ranger21"]
SchedulerName = Literal["CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CustomCosineAnnealingWarmUpRestarts"]


class ConfigError(CxrlabError):
    """A configuration file or override is invalid; the message names the key and what is allowed."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(StrictModel):
    """Random training-time augmentation, added after the deterministic eval transform's resize."""

    hflip_p: float = Field(0.5, ge=0, le=1, description="HorizontalFlip probability (the seed's only augmentation)")
    scale: tuple[float, float] = Field((1.0, 1.0), description="zoom range for Affine(scale=...); (1,1) = off")
    rotate_limit: float = Field(0.0, ge=0, le=45, description="max rotation in degrees; 0 = off")
    brightness: float = Field(0.0, ge=0, le=1, description="RandomBrightnessContrast brightness limit; 0 = off")
    contrast: float = Field(0.0, ge=0, le=1, description="RandomBrightnessContrast contrast limit; 0 = off")
    p: float = Field(0.5, ge=0, le=1, description="probability of each extra (non-flip) augmentation")

    @field_validator("scale")
    @classmethod
    def _scale_order(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {v}")
        return v


class SchedulerConfig(StrictModel):
    """Parameters of the learning-rate schedules (unused ones are ignored by the chosen schedule)."""

    t_0: int = Field(10, ge=1, description="first cycle length in epochs (WarmRestarts schedules)")
    t_mult: int = Field(1, ge=1, description="cycle length multiplier")
    eta_min: float = Field(1e-6, ge=0, description="floor learning rate")
    eta_max: float | None = Field(None, description="peak LR of the warm-up schedule; default learning_rate")
    t_up: int = Field(1, ge=0, description="warm-up epochs at the start of each cycle")
    gamma: float = Field(0.5, gt=0, le=1, description="peak decay factor per cycle")


class TrainerConfig(StrictModel):
    """Pass-through knobs of the Lightning Trainer, for smoke checks and debugging."""

    limit_train_batches: float | int = 1.0
    limit_val_batches: float | int = 1.0
    limit_test_batches: float | int = 1.0
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = None
    deterministic: bool = True
    enable_progress_bar: bool = True


class TrackingConfig(StrictModel):
    """Where runs are recorded. A local run directory is always written; W&B is optional."""

    wandb: Literal["auto", "online", "offline", "off"] = Field(
        "auto", description="auto = online when logged in, else offline"
    )
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    log_model: bool = Field(True, description="log the best model bundle as a W&B artifact (best only)")

    @field_validator("wandb", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads `wandb: off` / `--set tracking.wandb=off` as False (and `on` as True)
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v


class PreprocessConfig(StrictModel):
    """Deterministic preprocessing applied identically in training and inference (travels in the bundle);
    see ``cxrlab.preprocess`` for the order and what each step is for."""

    text_removal: Literal["none", "mask", "inpaint"] = "none"
    crop: Literal["none", "lungs"] = Field("none", description="crop to the segmented lung fields (+10% margin)")
    pad_square: bool = Field(False, description="pad to a square (black) instead of squashing the aspect ratio")
    intensity: Literal["none", "equalize", "clahe"] = Field(
        "none", description="per-image intensity standardisation: histogram equalisation or CLAHE"
    )


class Config(StrictModel):
    """The seed's training Config, field for field, plus what a real run needs."""

    project: str = "cxr-classification"
    seed: int = 42
    epochs: int = Field(20, ge=1)
    data: str | None = Field(None, description="split directory (from `cxrlab data split`) or its split.csv")
    evaluate: Literal["val", "test"] = Field("val", description="split used for the end-of-run evaluation")
    num_workers: int = Field(0, ge=0, description="DataLoader workers; 0 = load in the main process")
    device: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = "auto"
    model_name: str = "tf_efficientnetv2_b3"
    pre_trained: bool | str = Field(
        True, description="false, true (timm hub when reachable) or a path to local weights"
    )
    fine_tune: bool = Field(False, description="freeze the backbone and train only the classifier head")
    num_classes: int | None = Field(None, description="taken from the data; if set it must match")
    img_size: tuple[int, int] = Field((320, 300), description="(height, width) after Resize")
    in_chans: Literal[1, 3] = Field(3, description="3 = grayscale replicated (keeps ImageNet stem); 1 = gray stem")
    batch_size: int = Field(32, ge=1)
    optimizer: OptimizerName = "AdamW"
    learning_rate: float = Field(1e-3, gt=0)
    lr_scheduler: SchedulerName | None = None
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-6, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    imbalance: Literal["none", "sampler", "loss", "source"] = Field(
        "none",
        description="class imbalance: weighted sampler or class-weighted loss; source = sampler that draws every "
        "(source, class) cell of the training split equally often",
    )
    loss: Literal["ce", "groupdro"] = Field(
        "ce",
        description="ce = cross-entropy; groupdro = group-robust loss over (source, class) groups (Sagawa et al. "
        "2020): the worst groups get more weight",
    )
    groupdro_eta: float = Field(0.01, gt=0, description="GroupDRO step size of the group weights")
    precision: Literal["auto", "32", "16-mixed", "bf16-mixed"] = Field(
        "auto", description="auto = 16-mixed on CUDA, 32 on CPU"
    )
    early_stopping_patience: int | None = Field(None, ge=1)
    accumulate_grad_batches: int = Field(1, ge=1)
    channels_last: bool = Field(True, description="NHWC memory format (faster convolutions on CPU and GPU)")
    cache_images: bool = Field(True, description="decode + resize each image once and keep it in memory")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; default = all cores")
    shift_stats: bool = Field(
        True, description="store label-shift / OOD statistics in the bundle (one extra pass over train + val)"
    )
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    keep: Literal["last", "bundle", "all"] = Field(
        "last",
        description="what a finished run keeps besides its bundle: last = checkpoints/last.ckpt (enough for "
        "--resume to train on; best.ckpt is deleted: its weights are the bundle's), bundle = nothing else (cannot "
        "be resumed), all = both checkpoints",
    )
    output_dir: str = Field("runs", description="parent of the run directories")
    run_name: str | None = Field(None, description="run directory name; default <model>-<timestamp>")
    costly_class: str = Field(
        COSTLY_CLASS,
        min_length=1,
        description="the class whose false negatives cost most (matched across spellings: covid-19 = COVID19); its "
        "recall is the headline metric; a class the data lacks is an error when set, ignored when left default",
    )

    @field_validator("img_size")
    @classmethod
    def _img_size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 16:
            raise ValueError(f"img_size must be at least 16x16, got {v}")
        return v

    @model_validator(mode="after")
    def _fine_tune_needs_weights(self) -> Config:
        if self.fine_tune and self.pre_trained is False:
            raise ValueError("fine_tune=true freezes the backbone, which needs pre_trained weights (true or a path)")
        return self


# --------------------------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, e["loc"][:-1])
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"  unknown key '{loc}'{hint}; valid keys here: {', '.join(valid)}")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    cur: type[BaseModel] = model
    for part in loc:
        field = cur.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cur = ann
        else:
            return None
    return cur


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value`` into (["a", "b"], value); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. epochs=3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for ov in overrides or []:
        keys, value = parse_override(ov)
        set_dotted(out, keys, value)
    return out


def set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    """``data[k0][k1]...[kn] = value`` in place, creating (or replacing non-dict) intermediate levels."""
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def build_config(model: type[M], data: dict[str, Any], source: str = "<config>") -> M:
    """Validate ``data`` as ``model``; errors name the key and the valid choices."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, model, source)) from None


def field_default(model: type[BaseModel], name: str) -> Any:
    """The default of ``model``'s field ``name`` (its factory called), so other code can refer to it instead of
    writing the literal again. A required field has none: ``ConfigError``."""
    info = model.model_fields.get(name)
    if info is None:
        raise ConfigError(f"{model.__name__} has no field '{name}'; fields: {', '.join(model.model_fields)}")
    if info.is_required():
        raise ConfigError(f"{model.__name__}.{name} is required: it has no default")
    return info.get_default(call_default_factory=True)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a training Config from YAML (or defaults when ``path`` is None) plus ``key=value`` overrides."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    return build_config(Config, data, source=str(path or "defaults") + (" + overrides" if overrides else ""))


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
