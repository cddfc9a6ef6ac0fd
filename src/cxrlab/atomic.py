"""Atomic file output (and the one JSON writer, ``write_json``): a reader (or a crash) sees the old file or the
complete new one, never a 0-byte or half written file, and a failed write leaves no temp file behind.

The content goes to a hidden temp file in the target's folder (same file system, so ``os.replace`` is atomic),
is flushed to disk and then renamed over the target.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside ``path`` for a library that writes files by name (safetensors, ONNX ...); it replaces
    ``path`` when the ``with`` block ends without an error and is removed in any case."""
    target = Path(path)
    tmp = _tmp_name(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` that replaces ``path`` only when the ``with`` block ends without an error.

    ``mode`` is ``"w"`` or ``"wb"``; text mode defaults to UTF-8. Permissions are the usual ones for a new file
    (the umask applies), not the 0600 of ``tempfile``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    tmp = _tmp_name(target)
    try:
        with open(tmp, mode.replace("w", "x"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def json_safe(x: Any) -> Any:
    """``x`` with numpy scalars/arrays as Python values, paths as strings and NaN/inf as None (null): what
    ``json.dumps`` accepts and every JSON reader parses (``NaN`` is not JSON)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist") and hasattr(x, "dtype"):  # numpy array or scalar (numpy is not imported here)
        v = x.tolist()
        return json_safe(v) if isinstance(v, list | float) else v
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, doc: Any, *, indent: int | None = 2, default: Any = None) -> Path:
    """Write ``doc`` as JSON (``indent`` 2, a final newline) to ``path`` atomically; returns ``path``.
    ``default`` converts what json cannot (see ``json.dumps``); pass ``json_safe(doc)`` for numpy/NaN content."""
    return write_text_atomic(path, json.dumps(doc, indent=indent, default=default) + "\n")
