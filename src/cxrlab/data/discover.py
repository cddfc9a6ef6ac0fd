"""Finding the candidate images of an ingest and their labels: class folders, Kaggle's train/test layout (one
wrapper folder descended into), or a CSV of ``path,label[,patient_id][,source]``. Every file found is a
candidate, a reject with its reason, or listed as ignored (see ``cxrlab.data.ingest`` for the rules). Also the
SOURCES.csv reader (patient ids and sources per file) that ingest and :mod:`cxrlab.data.sources` share."""

from __future__ import annotations

import csv as csvlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrlab.data.manifest import DataError
from cxrlab.data.walk import Found, display_path, name_problem, scan_dir, subdirs, walk
from cxrlab.data.walk import classify_file as _classify_file

SPLIT_DIR_NAMES = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}
SOURCES_NAMES = {"sources.csv"}
_CSV_PATH_KEYS = ("path", "file", "filename", "file_name", "image", "image_path", "filepath")
_CSV_LABEL_KEYS = ("label", "class", "target", "finding_label")
_CSV_PATIENT_KEYS = ("patient_id", "patientid", "patient")
_CSV_SPLIT_KEYS = ("source_split", "split")
_SOURCES_FILE_KEYS = ("file", "path", "filename", "file_name", "image")
# ------------------------------------------------------------------------------------------ discovering files


@dataclass
class Candidate:
    path: Path  # absolute
    label: str
    source_split: str = ""
    patient_id: str = ""  # from a CSV column
    source: str = ""  # from a CSV column
    root: int = 0  # index of the root (cfg.roots) it was found under


@dataclass
class Scan:
    layout: str
    root: Path | None = None  # folder whose sub-folders were read (SRC, or the wrapper folder inside it)
    candidates: list[Candidate] = field(default_factory=list)
    rejects: list[dict[str, str]] = field(default_factory=list)  # found before decoding (missing, unlabelled)
    ignored: list[dict[str, str]] = field(default_factory=list)
    class_dirs: list[Path] = field(default_factory=list)
    sources_csvs: list[Path] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _note(scan: Scan, f: Found, label: str = "") -> None:
    """A name the walker could not read as a file (a reject with its reason) or did not search (ignored)."""
    if f.verdict == "broken":
        scan.rejects.append({"path": display_path(f.path), "reason": f.reason, "kind": f.kind, "label": label})
    else:
        scan.ignored.append({"path": display_path(f.path), "reason": f.reason})


def _add_candidate(scan: Scan, cand: Candidate) -> bool:
    """Queue ``cand`` for decoding, or reject it when its path cannot be written to the (UTF-8) manifest."""
    why = name_problem(cand.path)
    if why is not None:
        scan.rejects.append({"path": display_path(cand.path), "reason": why, "kind": "bad_name", "label": cand.label})
        return False
    scan.candidates.append(cand)
    return True


def _scan_class_dir(scan: Scan, class_dir: Path, label: str, split: str, skip: Path | None) -> None:
    n = 0
    for f in walk(class_dir, skip):
        if f.verdict != "file":
            _note(scan, f, label)
            continue
        why = _classify_file(f.path)
        if why is None:
            n += _add_candidate(scan, Candidate(f.path, label, split))
        else:
            scan.ignored.append({"path": display_path(f.path), "reason": why})
            if f.path.name.lower() in SOURCES_NAMES:
                scan.sources_csvs.append(f.path)
    if n == 0:
        scan.empty_classes.append(f"{split}/{label}" if split else label)


def _scan_loose_files(scan: Scan, folder: Path, where: str) -> None:
    """Files directly in SRC (or a split folder): images there have no class; the rest is ignored."""
    for f in scan_dir(folder):
        if f.verdict == "dir":
            continue
        if f.verdict != "file":
            _note(scan, f)
            continue
        why = _classify_file(f.path)
        if why is None:
            scan.rejects.append(
                {
                    "path": display_path(f.path),
                    "reason": f"image outside any class folder ({where}): no label",
                    "kind": "no_label",
                }
            )
        else:
            scan.ignored.append({"path": display_path(f.path), "reason": why})
            if f.path.name.lower() in SOURCES_NAMES:
                scan.sources_csvs.append(f.path)


def _subdirs(folder: Path, skip: Path | None) -> list[Path]:
    return subdirs(folder, skip)


def _split_dirs(folder: Path, skip: Path | None) -> list[Path]:
    return [d for d in _subdirs(folder, skip) if d.name.lower() in SPLIT_DIR_NAMES and _subdirs(d, skip)]


def scan_folder(src: Path, skip: Path | None) -> Scan:
    subdirs = _subdirs(src, skip)
    if not subdirs:
        what = "holds only files" if any(p.is_file() for p in src.iterdir()) else "is empty"
        raise DataError(
            f"{src} {what}: expected one sub-folder per class (e.g. {src}/NORMAL/*.png), a Kaggle folder with "
            "train/ and test/ holding class folders, or a CSV of path,label (pass the CSV file as SRC)"
        )
    scan = Scan("class-folders")
    _scan_loose_files(scan, src, "top level")
    root = src
    if len(subdirs) == 1 and not _split_dirs(src, skip) and _split_dirs(subdirs[0], skip):
        root = subdirs[0]  # a wrapper folder around the Kaggle layout (its Data/)
        subdirs = _subdirs(root, skip)
        _scan_loose_files(scan, root, f"{root.name}/")
    scan.root = root
    splits = _split_dirs(root, skip)
    if not splits:
        for cd in subdirs:
            scan.class_dirs.append(cd)
            _scan_class_dir(scan, cd, cd.name, "", skip)
        return scan
    scan.layout = "kaggle"
    for other in (d for d in subdirs if d not in splits):
        scan.warnings.append(f"{other} sits beside the split folders of a Kaggle layout; its images are rejects")
        for f in walk(other, skip):
            if f.verdict != "file":
                _note(scan, f)
                continue
            why = _classify_file(f.path)
            if why is None:
                reason = f"image in {other.name}/, not in a class folder under {'/'.join(d.name for d in splits)}"
                scan.rejects.append({"path": display_path(f.path), "reason": reason, "kind": "no_label"})
            else:
                scan.ignored.append({"path": display_path(f.path), "reason": why})
    for sd in splits:
        split = SPLIT_DIR_NAMES[sd.name.lower()]
        _scan_loose_files(scan, sd, f"{sd.name}/")
        for cd in _subdirs(sd, skip):
            scan.class_dirs.append(cd)
            _scan_class_dir(scan, cd, cd.name, split, skip)
    return scan


def _pick(header: list[str], keys: Iterable[str]) -> int | None:
    low = [h.strip().lower() for h in header]
    for k in keys:
        if k in low:
            return low.index(k)
    return None


def scan_csv(src: Path, source_column: str = "source") -> Scan:
    scan = Scan("csv")
    try:
        with open(src, newline="", encoding="utf-8-sig") as f:
            sample = f.read(4096)
            f.seek(0)
            try:
                dialect: Any = csvlib.Sniffer().sniff(sample, delimiters=",;\t")
            except csvlib.Error:
                dialect = csvlib.excel
            rows = [r for r in csvlib.reader(f, dialect) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read CSV {src}: {e}") from None
    if not rows:
        raise DataError(f"CSV {src} is empty: expected rows of path,label[,patient_id]")
    header = rows[0]
    ip, il = _pick(header, _CSV_PATH_KEYS), _pick(header, _CSV_LABEL_KEYS)
    if ip is not None and il is not None:
        ipat, isplit, body = _pick(header, _CSV_PATIENT_KEYS), _pick(header, _CSV_SPLIT_KEYS), rows[1:]
        isrc = _pick(header, (source_column.strip().lower(),))
        first_line = 2
    elif ip is not None or il is not None:
        raise DataError(
            f"CSV {src} has a header {header} without both a path column ({'/'.join(_CSV_PATH_KEYS)}) "
            f"and a label column ({'/'.join(_CSV_LABEL_KEYS)})"
        )
    else:  # no header: path,label[,patient_id]
        if len(header) < 2:
            raise DataError(f"CSV {src}: expected at least two columns path,label, got {header}")
        ip, il, ipat, isplit, body, first_line = 0, 1, (2 if len(header) > 2 else None), None, rows, 1
        isrc = None
    base = src.parent
    for i, r in enumerate(body, start=first_line):

        def cell(j: int | None, r: list[str] = r) -> str:
            return r[j].strip() if j is not None and j < len(r) else ""

        raw, label = cell(ip), cell(il)
        if not raw:
            scan.rejects.append({"path": f"{src}:{i}", "reason": "CSV row without a path", "kind": "no_path"})
            continue
        p = Path(raw).expanduser()
        p = p if p.is_absolute() else base / p
        p = Path(os.path.abspath(p))
        if not label:
            scan.rejects.append({"path": str(p), "reason": f"CSV row {i} has no label", "kind": "no_label"})
            continue
        if not p.is_file():
            why = "is a directory, not an image file" if p.is_dir() else "file not found"
            scan.rejects.append({"path": str(p), "reason": f"{why} (CSV row {i})", "kind": "not_found", "label": label})
            continue
        split = cell(isplit).lower()
        _add_candidate(scan, Candidate(p, label, SPLIT_DIR_NAMES.get(split, split), cell(ipat), cell(isrc)))
    if not scan.candidates and not scan.rejects:
        raise DataError(f"CSV {src} lists no images: expected rows of path,label[,patient_id]")
    return scan


# ------------------------------------------------------------------------------------------ SOURCES.csv


def load_sources_csv(paths: list[Path], column: str = "patient_id") -> tuple[dict[str, str], dict[str, str]]:
    """(absolute path -> value, "<csv folder>/<file name>" -> value for names unique in that CSV) of ``column`` in
    SOURCES.csv files. A file name only matches images below the CSV's own folder (:func:`sources_lookup`):
    another root's ``NORMAL/1.png`` is not this one's."""
    by_path: dict[str, str] = {}
    by_name: dict[str, str | None] = {}
    column = column.strip().lower()
    for p in paths:
        try:
            with open(p, newline="", encoding="utf-8-sig") as f:
                reader = csvlib.DictReader(f)
                fields = [c.strip().lower() for c in reader.fieldnames or []]
                if column not in fields:
                    continue
                orig = {c.strip().lower(): c for c in reader.fieldnames or []}
                key = next((orig[k] for k in _SOURCES_FILE_KEYS if k in orig), None)
                if key is None:
                    continue
                pid_key = orig[column]
                for row in reader:
                    name, pid = (row.get(key) or "").strip(), (row.get(pid_key) or "").strip()
                    if not name or not pid:
                        continue
                    by_path[os.path.normpath(os.path.join(p.parent, name))] = pid
                    base = os.path.join(str(p.parent), os.path.basename(name))
                    by_name[base] = pid if by_name.get(base, pid) == pid else None
        except (OSError, UnicodeDecodeError, csvlib.Error):
            continue  # it stays listed under "ignored"; patient ids fall back to the next rule
    return by_path, {k: v for k, v in by_name.items() if v is not None}


def sources_lookup(sources: tuple[dict[str, str], dict[str, str]], path: Path) -> str:
    """The SOURCES.csv value of ``path`` (absolute): by its path, else by its file name in the CSV of its nearest
    ancestor folder that has one; "" when none matches."""
    by_path, by_name = sources
    hit = by_path.get(str(path))
    if hit or not by_name:
        return hit or ""
    for parent in path.parents:
        hit = by_name.get(os.path.join(str(parent), path.name))
        if hit:
            return hit
    return ""
