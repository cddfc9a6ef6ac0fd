"""The shared inference core: the device resolver and the batched read loop (every stage that runs a model
over images uses them)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
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


@dataclass
class ReadBatch:
    """Decoded images of one batch: ``indices`` into the path list and the 2-D uint8 ``grays`` in that order."""

    indices: list[int]
    grays: list[np.ndarray]


def read_batches(
    paths: Sequence[str],
    batch_size: int,
    skipped: list[dict[str, str]],
    progress: bool = True,
    desc: str = "predict",
) -> Iterator[ReadBatch]:
    """The batched read loop every data-set stage runs a model over (evaluate, explain): decode each path with
    ``read_xray``, append an unreadable or missing file to ``skipped`` as ``{path, reason}`` and go on, yield the
    readable ones ``batch_size`` at a time, with one progress bar over all paths."""
    from tqdm.auto import tqdm

    from cxrlab.data.io import ImageReadError, read_xray

    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, len(paths), batch_size):
            batch = ReadBatch([], [])
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    batch.grays.append(read_xray(paths[i]))
                    batch.indices.append(i)
                except ImageReadError as e:
                    skipped.append({"path": paths[i], "reason": str(getattr(e, "reason", None) or e)})
                except FileNotFoundError:
                    skipped.append({"path": paths[i], "reason": "file not found"})
            if batch.indices:
                yield batch
            bar.update(min(batch_size, len(paths) - start))
    finally:
        bar.close()
