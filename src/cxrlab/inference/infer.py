"""The shared inference core: the device resolver and the batched read loop (every stage that runs a model
over images uses them)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    colours: list[float] = field(default_factory=list)  # share of coloured pixels per image (``colour=True``)


_GREY_MODES = ("1", "L", "LA", "I", "F")


def read_gray_colour(path: str | Path, need_colour: bool) -> tuple[np.ndarray, float]:
    """(2-D uint8 image, share of coloured pixels): the file is read a second time only when its original
    mode is a colour mode and ``need_colour`` (the OOD input check) asks for it."""
    from cxrlab.data.io import read_xray_with_info

    gray, info = read_xray_with_info(path, dtype="uint8")
    if not need_colour or info.format == "DICOM" or info.mode in _GREY_MODES or info.mode.startswith("I;"):
        return gray, 0.0
    from cxrlab.analysis.ood import colour_share

    return gray, colour_share(Path(path).read_bytes())


def read_batches(
    paths: Sequence[str],
    batch_size: int,
    skipped: list[dict[str, str]],
    progress: bool = True,
    desc: str = "predict",
    colour: bool = False,
) -> Iterator[ReadBatch]:
    """The batched read loop every data-set stage runs a model over (evaluate, explain): decode each path with
    ``read_xray``, append an unreadable or missing file to ``skipped`` as ``{path, reason}`` and go on, yield the
    readable ones ``batch_size`` at a time, with one progress bar over all paths. With ``colour`` each batch also
    carries the share of coloured pixels of every image (:func:`read_gray_colour`, for the OOD input check)."""
    from tqdm.auto import tqdm

    from cxrlab.data.io import ImageReadError

    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, len(paths), batch_size):
            batch = ReadBatch([], [])
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    gray, col = read_gray_colour(paths[i], colour)
                    batch.grays.append(gray)
                    batch.colours.append(col)
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
