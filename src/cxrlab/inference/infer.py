"""The shared inference core: the device resolver, the one forward pass and the one batched read loop. Every stage
that runs a model over images uses them: evaluate, explain, predict, serve (and shift fitting, mining)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------------------------------ forward pass


def softmax_rows(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Class probabilities (float64 rows summing to 1) from a batch of logits, on the CPU."""
    return torch.softmax(torch.as_tensor(logits).float().cpu().double(), dim=1).numpy()


def forward_pass(
    model: torch.nn.Module, x: torch.Tensor, features: bool = False, channels_last: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """The one forward pass over a preprocessed batch (N x C x H x W) on ``model``'s device, without autograd:
    (softmax probabilities N x classes as float64, penultimate features N x D as float32 or None).

    ``features``: also the penultimate features of a timm model from the same pass (the feature map goes through
    the head twice, once stopping before the classifier, ``pre_logits``). ``channels_last``: give the input that
    memory format (for a model converted to it: measured 1.5-1.9x faster eager inference for timm CNNs here).
    Grad-CAM (``cxrlab.analysis.cam``) is the one other forward pass: it needs gradients."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not features:
            return softmax_rows(model(x)), None
        fmap = model.forward_features(x)
        feats = model.forward_head(fmap, pre_logits=True).float().flatten(1).cpu().numpy()
        logits = model.forward_head(fmap)
    return softmax_rows(logits), feats


# --------------------------------------------------------------------------------------------- read loop


@dataclass
class ReadBatch:
    """One batch of the read loop: the readable images (``indices`` into the path list, in order, with the decoded
    2-D uint8 ``grays``, their ``colours`` and ``inputs``) and the unreadable ones (``failed``: (index, reason)).
    A batch may hold no readable image at all."""

    indices: list[int]
    grays: list[np.ndarray]
    colours: list[float] = field(default_factory=list)  # share of coloured pixels per image (``colour=True``)
    inputs: list[Any] = field(default_factory=list)  # ``prepare(gray)`` per readable image (``prepare`` given)
    failed: list[tuple[int, str]] = field(default_factory=list)

    def stack(self) -> torch.Tensor:
        """The prepared inputs as one batch tensor (``prepare`` must return tensors)."""
        return torch.stack(self.inputs)


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


def read_failure(e: Exception) -> str:
    """Why a file could not be read, in one printable line (an ``ImageReadError``'s own reason)."""
    from cxrlab.data.walk import display_path

    if isinstance(e, FileNotFoundError):
        return "file not found"
    # display_path: a message that quotes a non-UTF-8 file name must still print and go into a UTF-8 table
    return display_path(str(getattr(e, "reason", None) or f"{type(e).__name__}: {e}"))


def read_batches(
    paths: Sequence[str | Path],
    batch_size: int,
    skipped: list[dict[str, str]],
    progress: bool | None = True,
    desc: str = "predict",
    colour: bool = False,
    prepare: Callable[[np.ndarray], Any] | None = None,
    workers: int = 2,
    problems: Sequence[str | None] | None = None,
) -> Iterator[ReadBatch]:
    """The one batched read loop: decode each path (``read_xray``), ``batch_size`` at a time, in path order, with
    one progress bar over all paths (``progress`` None: only when stderr is a terminal).

    ``prepare`` (e.g. ``Bundle.preprocess``) runs on each decoded image in the reader threads; its results are the
    batch's ``inputs``. With ``workers`` >= 1 a pool of that many threads decodes and prepares the next batch while
    the caller runs the model on this one (PIL/pydicom/OpenCV release the GIL; at most two batches are held); 0
    reads in the calling thread. ``colour``: each batch also carries the share of coloured pixels of every image
    (:func:`read_gray_colour`, for the OOD input check). ``problems``: a known reason per path (None = read it),
    e.g. the walker's dangling symlinks: such a path is not opened.

    A file that fails (missing, corrupt, unsupported, a decoder bug) never ends a run over thousands of files: it
    goes into its batch's ``failed`` and into ``skipped`` as ``{path, reason}``, and the loop goes on.
    """
    from tqdm.auto import tqdm

    def one(i: int) -> tuple[np.ndarray | None, float, Any, str | None]:
        if problems is not None and problems[i] is not None:
            return None, 0.0, None, problems[i]
        try:
            gray, col = read_gray_colour(paths[i], colour)
            return gray, col, (prepare(gray) if prepare is not None else None), None
        except Exception as e:
            return None, 0.0, None, read_failure(e)

    def assemble(chunk: range, done: list[tuple[np.ndarray | None, float, Any, str | None]]) -> ReadBatch:
        batch = ReadBatch([], [])
        for i, (gray, col, inp, why) in zip(chunk, done, strict=True):
            if why is not None:
                batch.failed.append((i, why))
                skipped.append({"path": str(paths[i]), "reason": why})
                continue
            batch.indices.append(i)
            batch.grays.append(gray)
            batch.colours.append(col)
            if prepare is not None:
                batch.inputs.append(inp)
        return batch

    chunks = [range(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size)]
    disable = None if progress is None else not progress  # None: tqdm shows the bar only on a terminal
    with tqdm(total=len(paths), desc=desc, unit="img", disable=disable, leave=False) as bar:
        if workers < 1 or not chunks:
            for chunk in chunks:
                batch = assemble(chunk, [one(i) for i in chunk])
                bar.update(len(chunk))
                yield batch
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = [pool.submit(one, i) for i in chunks[0]]
            for k, chunk in enumerate(chunks):
                done = [f.result() for f in pending]
                pending = [pool.submit(one, i) for i in chunks[k + 1]] if k + 1 < len(chunks) else []
                bar.update(len(chunk))
                yield assemble(chunk, done)
