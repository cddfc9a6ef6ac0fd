"""The shared inference core: the device resolver (every stage that runs a model asks here)."""

from __future__ import annotations

import torch

from cxrlab.errors import CxrlabError


class DeviceError(CxrlabError):
    """A device name that is not valid here."""


def resolve_device(device: str | torch.device = "auto", error: type[CxrlabError] = DeviceError) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``gpu`` means ``cuda``; anything else is parsed by
    ``torch.device``. An invalid name, or CUDA asked for on a machine without it, raises ``error`` (the calling
    stage's error type, so its CLI reports it like its other input errors)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "gpu":
        device = "cuda"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise error(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {device!r} asked for but CUDA is not available; use --device auto or cpu")
    return dev
