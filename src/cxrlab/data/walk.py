"""The one file walker of every stage that reads a folder of images (``data ingest``, ``predict``).

Both stages see the same files and give every file found one of three verdicts, so they can never disagree
about what is in a folder and nothing is dropped without a reason:

- ``file``: a regular file, or a symlink to one. Whether it is an image candidate is :func:`classify_file`'s
  call (the same rule in both stages).
- ``broken``: a name that cannot be read as a file: a dangling symlink, a symlink loop (``a -> b -> a``), a
  permission error. Ingest lists it in ``rejects.csv``; predict reports it as an error row.
- ``ignored``: a folder that is not searched, with the reason: a hidden folder (``.git``), a symlinked folder
  that leads back to a folder already searched (a loop, or a second link to the same folder), a folder that
  cannot be listed; also special files (fifo, socket, device).

Symlinked folders are followed, with loop protection: a folder whose real path was already searched in the same
walk is not entered again. Names come from the file system as Python ``str`` (bytes that are not valid UTF-8
become lone surrogates, ``os.fsdecode``); :func:`display_path` turns such a name into printable text and
:func:`name_problem` says why a stage that writes UTF-8 tables cannot record it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cxrlab.data.io import IMAGE_EXTENSIONS, sniff_format

Verdict = Literal["file", "broken", "ignored", "dir"]


@dataclass(frozen=True)
class Found:
    """One name met by the walker. ``reason`` says why a ``broken``/``ignored`` entry is not read; ``kind`` is a
    short machine name for it (``dangling_link``, ``symlink_loop``, ``unreadable``, ``hidden_dir`` ...)."""

    path: Path
    verdict: Verdict
    reason: str = ""
    kind: str = ""


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def display_path(path: str | Path) -> str:
    """``path`` as printable UTF-8 text: bytes of a non-UTF-8 name are shown as ``\\xff`` escapes (the name as it is
    on disk; a terminal, a CSV or JSON file cannot hold the raw bytes)."""
    s = os.fspath(path)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def name_problem(path: str | Path) -> str | None:
    """None when the path is valid UTF-8 text, else the reason (tables written as UTF-8 cannot hold the name)."""
    s = os.fspath(path)
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return (
            f"the file name is not valid UTF-8 ({display_path(s)}): the manifest and every table after it are UTF-8 "
            "text and could not name this file; rename it to a UTF-8 name and ingest again"
        )


def classify_file(path: Path) -> str | None:
    """None when ``path`` (a readable file) is an image candidate, else the reason it is not one.

    Candidates: an extension in :data:`cxrlab.data.io.IMAGE_EXTENSIONS` (any case), or no real extension and
    content that sniffs as an image or DICOM. Hidden files are never candidates.
    """
    if is_hidden(path.name):
        return "hidden file"
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return None
    if suffix == "" or not suffix[1:].isalpha():  # no real extension: decide by content
        try:
            with open(path, "rb") as f:
                head = f.read(132)
        except OSError as e:
            return f"unreadable: {e.strerror or e}"
        return None if head and sniff_format(head, path.name) else "no image extension and not an image by content"
    return f"not an image extension ({suffix})"


def _broken(path: Path, err: OSError) -> Found:
    try:
        target = os.readlink(path)
    except OSError:
        target = None
    if target is not None and err.errno == errno.ELOOP:
        return Found(path, "broken", f"symlink loop: {path.name} -> {target} never reaches a file", "symlink_loop")
    if target is not None and err.errno in (errno.ENOENT, errno.ENOTDIR):
        return Found(path, "broken", f"dangling symlink: its target {target} does not exist", "dangling_link")
    return Found(path, "broken", f"cannot read: {err.strerror or err}", "unreadable")


def scan_dir(folder: Path) -> list[Found]:
    """One level of ``folder``, sorted by name: ``file``, ``broken``, ``ignored`` and ``dir`` entries (a folder or a
    symlink to one). A folder that cannot be listed is one ``ignored`` entry for the folder itself."""
    try:
        with os.scandir(folder) as it:
            names = sorted(de.name for de in it)
    except OSError as e:
        return [Found(folder, "ignored", f"cannot list the folder: {e.strerror or e}", "unreadable_dir")]
    out: list[Found] = []
    for name in names:
        p = folder / name
        try:
            st = os.stat(p)  # follows symlinks: a link is what it points to
        except OSError as e:
            out.append(_broken(p, e))
            continue
        if stat.S_ISDIR(st.st_mode):
            out.append(Found(p, "dir"))
        elif stat.S_ISREG(st.st_mode):
            out.append(Found(p, "file"))
        else:
            out.append(Found(p, "ignored", "not a regular file (fifo, socket or device)", "special"))
    return out


def subdirs(folder: Path, skip: Path | None = None) -> list[Path]:
    """The searchable sub-folders of ``folder`` (symlinked ones included; hidden ones and ``skip`` left out)."""
    skip_real = os.path.realpath(skip) if skip is not None else None
    return [
        f.path
        for f in scan_dir(folder)
        if f.verdict == "dir"
        and not is_hidden(f.path.name)
        and f.path != skip
        and (skip_real is None or os.path.realpath(f.path) != skip_real)
    ]


def walk(root: Path, skip: Path | None = None) -> Iterator[Found]:
    """Every name under ``root``, depth first in name order: ``file``, ``broken`` and ``ignored`` entries (folders
    themselves are not yielded unless ignored). Symlinked folders are followed; one whose real path was already
    searched in this walk is ``ignored`` (kind ``symlink_loop``) instead of entered again. ``skip`` (e.g. the
    output folder inside the source) is left out without an entry."""
    skip_real = os.path.realpath(skip) if skip is not None else None
    visited = {os.path.realpath(root)}
    stack: list[Iterator[Found]] = [iter(scan_dir(root))]
    while stack:
        f = next(stack[-1], None)
        if f is None:
            stack.pop()
            continue
        if f.verdict != "dir":
            yield f
            continue
        real = os.path.realpath(f.path)
        if f.path == skip or real == skip_real:
            continue
        if is_hidden(f.path.name):
            yield Found(f.path, "ignored", "hidden folder: not searched", "hidden_dir")
            continue
        if real in visited:
            yield Found(
                f.path,
                "ignored",
                f"symlinked folder -> {display_path(real)} was already searched (a symlink loop or a second link to "
                "the same folder): not searched again",
                "symlink_loop",
            )
            continue
        visited.add(real)
        stack.append(iter(scan_dir(f.path)))
