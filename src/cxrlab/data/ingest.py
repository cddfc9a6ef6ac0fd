"""Ingest: a folder (or CSV) of X-rays -> ``manifest.csv`` + ``rejects.csv`` + ``ingest.json``.

Accepted layouts (detected from SRC):

- ``class-folders``: ``SRC/<class>/**/<image>``; the label is the top-level folder name.
- ``kaggle``: ``SRC/train/<class>/...`` + ``SRC/test/<class>/...`` (also ``val``/``valid``/``validation``);
  the original split is kept in the ``source_split`` column. A single wrapper folder holding that layout
  (Kaggle's ``Data/``) is descended into.
- ``csv``: SRC is a CSV of ``path,label[,patient_id]`` (a header naming those columns, or exactly that order
  without a header; optional ``source_split``/``split`` column). Relative paths resolve against the CSV's folder.

Which files are candidates: files whose extension is in :data:`cxrlab.data.io.IMAGE_EXTENSIONS` (any case),
and extension-less files whose content sniffs as an image or DICOM. Every candidate ends up either in the
manifest or in ``rejects.csv`` with its reason (a ``.png`` that holds text is a reject, not skipped). Other files
(``SOURCES.csv``, ``README.md``, hidden files such as ``.DS_Store``) are not images: they are listed under
``ignored`` in ``ingest.json`` and counted in the summary, never dropped silently. Images outside any class
folder cannot be labelled and are rejects. Folders are read by :mod:`cxrlab.data.walk`, the walker ``predict``
uses too: symlinked folders are followed (a loop is listed under ``ignored``), dangling symlinks and symlink
loops are rejects with their reason, and a file whose name is not valid UTF-8 is a reject (``bad_name``: the
manifest is UTF-8 text) instead of ending the run.

Source (the hospital or collection an image comes from; the ``source`` column), first that applies: the CSV
listing's ``source_column`` (default ``source``); ``source_regex`` on the image's path below the root's parent
(``cxr-tiny/COVID19/x.jpg``: first group, else the whole match); the name given for its root
(``source_names``); a ``SOURCES.csv`` beside the images with a ``source_column`` column (rows matched by path,
else by file name when unique); else the root folder's name. Several roots (``src`` plus ``extra_src``) go
into one manifest; path-based patient ids then start with the root's folder name so two roots never share one.

Each candidate is read once: sha256 of the bytes, then one decode (:func:`cxrlab.data.io.decode_xray`) gives
size / mode / bit depth and the 8-bit image for the perceptual hash (``imagehash.phash``, 16 hex chars). Work
runs in a process pool (``workers``, default 2) with a progress bar.

Patient id, first that applies: the CSV's ``patient_id`` column; ``patient_regex`` on the file name (first
group, else the whole match); a ``SOURCES.csv`` (in SRC, a split folder or a class folder) with a
``patient_id`` column and a ``file``/``path``/``filename`` column naming the image (relative to that CSV's
folder, or by file name when unique); else the image's path relative to SRC (the CSV's folder for a CSV) without
its extension, e.g. ``NORMAL/img1``: each image its own patient. Not the bare file stem, which repeats across
class folders (``A/1.png``, ``B/1.png``) and would wrongly group unrelated images.
"""

from __future__ import annotations

import csv as csvlib
import hashlib
import os
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrlab.atomic import atomic_open, write_json
from cxrlab.data.configs import IngestConfig
from cxrlab.data.discover import Candidate, Scan, load_sources_csv, scan_csv, scan_folder, sources_lookup
from cxrlab.data.io import ImageReadError, decode_xray
from cxrlab.data.manifest import MANIFEST_COLUMNS, MANIFEST_FILE, REJECTS_FILE, DataError
from cxrlab.data.parallel import map_files
from cxrlab.data.walk import display_path

INGEST_META_FILE = "ingest.json"
REJECT_COLUMNS = ["path", "reason", "kind", "label"]


@dataclass
class IngestResult:
    """Counts and paths of one ingest run (the same numbers are in ``ingest.json``)."""

    out: Path
    layout: str  # "class-folders" | "kaggle" | "csv"
    classes: list[str]
    counts: dict[str, int]  # images per class
    counts_by_split: dict[str, dict[str, int]]  # source_split ("" when none) -> class -> images
    n_candidates: int
    n_images: int
    n_rejected: int
    n_duplicate: int  # sha256 groups holding more than one file
    n_duplicate_files: int  # files in those groups
    n_ignored: int  # non-image files seen and not ingested (listed in ingest.json)
    n_patients: int
    patient_id_sources: dict[str, int]  # csv / regex / SOURCES.csv / path -> images
    manifest_path: Path
    rejects_path: Path
    summary_path: Path
    rejects: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    roots: list[Path] = field(default_factory=list)
    counts_by_source: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> class -> images
    source_from: dict[str, int] = field(default_factory=dict)  # csv / regex / name / SOURCES.csv / root -> images

    @property
    def files(self) -> list[Path]:
        return [self.manifest_path, self.rejects_path, self.summary_path]


class IngestRejectsError(DataError):
    """``strict`` ingest found rejected files; ``.result`` holds the (already written) result."""

    def __init__(self, message: str, result: IngestResult) -> None:
        super().__init__(message)
        self.result = result


# ----------------------------------------------------------------------------------------------- patient ids


def _path_id(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:  # a CSV may list files outside its folder
        rel = path
    return rel.with_suffix("").as_posix()


def _patient_ids(
    cands: list[Candidate], regex: str | None, sources: tuple[dict[str, str], dict[str, str]], root: Path
) -> tuple[list[str], Counter[str]]:
    rx = re.compile(regex) if regex else None
    out: list[str] = []
    used: Counter[str] = Counter()
    for c in cands:
        pid, src = c.patient_id, "csv"
        if not pid and rx is not None:
            m = rx.search(c.path.name)
            if m:
                pid = next((g for g in m.groups() if g), None) or m.group(0)
                src = "regex"
        if not pid and (sources[0] or sources[1]):
            pid = sources_lookup(sources, c.path)
            src = "SOURCES.csv"
        if not pid:
            pid, src = _path_id(c.path, root), "path"
        out.append(pid)
        used[src] += 1
    return out, used


# --------------------------------------------------------------------------------------------------- decoding


def _inspect(path: str) -> tuple[str, ...]:
    """Worker: one file -> ("ok", sha256, width, height, mode, bit_depth, phash) or ("reject", kind, reason)."""
    import imagehash
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return ("reject", "unreadable", f"cannot open: {e.strerror or e}")
    try:
        img, info = decode_xray(data, path, "uint8")
    except ImageReadError as e:
        return ("reject", e.kind, e.reason)
    sha = hashlib.sha256(data).hexdigest()
    phash = str(imagehash.phash(Image.fromarray(img)))
    return ("ok", sha, str(info.width), str(info.height), info.mode, str(info.bit_depth), phash)


def _run_all(paths: list[str], workers: int, progress: bool) -> list[tuple[str, ...]]:
    return map_files(_inspect, paths, workers, "ingest", progress)


# ------------------------------------------------------------------------------------------------------ ingest


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    # atomic: a failure half-way leaves the previous file (or none) and no temp file
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csvlib.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})


def _scan_src(src: Path, cfg: IngestConfig, out: Path) -> Scan:
    """Candidates, rejects and ignored files of one root (folder layouts or a CSV listing)."""
    if not src.exists():
        raise DataError(f"ingest source not found: {src} (give a folder of class folders or a CSV of path,label)")
    as_csv = cfg.csv if cfg.csv is not None else (src.is_file() and src.suffix.lower() in (".csv", ".tsv"))
    if as_csv:
        if not src.is_file():
            raise DataError(f"--csv was given but {src} is not a file")
        scan = scan_csv(src, cfg.source_column)
    elif src.is_file():
        raise DataError(
            f"{src} is a file: give a folder of class folders, or a CSV of path,label (a *.csv, or add --csv)"
        )
    else:
        scan = scan_folder(src, skip=out)
    if not scan.candidates and not scan.rejects:
        raise DataError(f"no images found under {src}: the class folders {[d.name for d in scan.class_dirs]} are empty")
    return scan


def _root_name(src: Path, layout: str) -> str:
    """A root's default source name: its folder's name (a CSV listing: the folder holding the CSV)."""
    return (src.parent if layout == "csv" else src).name or str(src)


def _sources(
    cands: list[Candidate],
    cfg: IngestConfig,
    roots: list[Path],
    root_names: list[str],
    from_csv: tuple[dict[str, str], dict[str, str]],
) -> tuple[list[str], Counter[str]]:
    """The source of every candidate and how many got it from each rule (see the module doc for the order)."""
    rx = re.compile(cfg.source_regex) if cfg.source_regex else None
    out: list[str] = []
    used: Counter[str] = Counter()
    for c in cands:
        src, how = c.source, "csv"
        if not src and rx is not None:
            try:
                rel = c.path.relative_to(roots[c.root].parent).as_posix()
            except ValueError:  # a CSV may list files outside its folder
                rel = c.path.as_posix()
            m = rx.search(rel)
            if m:
                src, how = next((g for g in m.groups() if g), None) or m.group(0), "regex"
        if not src and c.root < len(cfg.source_names):
            src, how = cfg.source_names[c.root], "name"
        if not src and (from_csv[0] or from_csv[1]):
            src, how = sources_lookup(from_csv, c.path), "SOURCES.csv"
        if not src:
            src, how = root_names[c.root], "root"
        out.append(src)
        used[how] += 1
    return out, used


def ingest(cfg: IngestConfig) -> IngestResult:
    """Read every candidate image under ``cfg.src`` (and ``cfg.extra_src``) once and write manifest.csv,
    rejects.csv and ingest.json to ``cfg.out``. Rejected files are listed with reasons (a warning; an error with
    ``strict``); a missing or empty source, or a source with no class folders, raises :class:`DataError`."""
    t0 = time.perf_counter()
    roots = [Path(os.path.abspath(Path(r).expanduser())) for r in cfg.roots]
    out = Path(os.path.abspath(Path(cfg.out).expanduser()))
    if len(set(roots)) < len(roots):
        raise DataError(f"a root is given twice: {[str(r) for r in roots]}")
    if len(cfg.source_names) > len(roots):
        raise DataError(f"{len(cfg.source_names)} source names for {len(roots)} root(s): give one name per root")
    scans = [_scan_src(r, cfg, out) for r in roots]
    for i, sc in enumerate(scans):
        for c in sc.candidates:
            c.root = i
    scan = scans[0]
    if len(scans) > 1:  # one scan over every root; the per-root facts that matter are kept on the candidates
        scan = Scan("+".join(dict.fromkeys(sc.layout for sc in scans)), root=scans[0].root)
        for sc in scans:
            scan.candidates += sc.candidates
            scan.rejects += sc.rejects
            scan.ignored += sc.ignored
            scan.class_dirs += sc.class_dirs
            scan.sources_csvs += sc.sources_csvs
            scan.empty_classes += [f"{sc.root.name if sc.root else ''}/{e}" for e in sc.empty_classes]
            scan.warnings += sc.warnings
    src = roots[0]
    seen: set[Path] = set()
    for c in scan.candidates:
        if c.path in seen:
            raise DataError(
                f"{c.path} is found under two of the roots {[str(r) for r in roots]}: give roots that do not overlap"
            )
        seen.add(c.path)

    results = _run_all([str(c.path) for c in scan.candidates], cfg.workers, cfg.progress)

    sources: tuple[dict[str, str], dict[str, str]] = ({}, {})
    source_csv: tuple[dict[str, str], dict[str, str]] = ({}, {})
    if cfg.use_sources_csv and scan.sources_csvs:
        sources = load_sources_csv(scan.sources_csvs)
        source_csv = load_sources_csv(scan.sources_csvs, cfg.source_column)
    good = [(c, r) for c, r in zip(scan.candidates, results, strict=True) if r[0] == "ok"]
    # patient ids per root: with several roots a path-based id starts with the root's folder name
    pid_of: dict[int, str] = {}
    pid_used: Counter[str] = Counter()
    for i, (r, sc) in enumerate(zip(roots, scans, strict=True)):
        mine = [c for c, _ in good if c.root == i]
        id_root = r.parent if sc.layout == "csv" else r
        if len(roots) > 1:
            id_root = id_root.parent
        ids, used = _patient_ids(mine, cfg.patient_regex, sources, id_root)
        pid_used.update(used)
        pid_of.update({id(c): p for c, p in zip(mine, ids, strict=True)})
    pids = [pid_of[id(c)] for c, _ in good]
    root_names = [_root_name(r, sc.layout) for r, sc in zip(roots, scans, strict=True)]
    srcs, src_used = _sources([c for c, _ in good], cfg, roots, root_names, source_csv)
    rows: list[dict[str, Any]] = []
    for (c, r), pid, source in zip(good, pids, srcs, strict=True):
        _, sha, w, h, mode, bits, phash = r
        rows.append(
            {
                "path": str(c.path),
                "label": c.label,
                "sha256": sha,
                "width": int(w),
                "height": int(h),
                "mode": mode,
                "bit_depth": int(bits),
                "patient_id": pid,
                "source_split": c.source_split,
                "phash": phash,
                "source": source,
            }
        )
    rows.sort(key=lambda r: (r["label"], r["source_split"], r["path"]))
    rejects = list(scan.rejects)
    for c, r in zip(scan.candidates, results, strict=True):
        if r[0] != "ok":
            rejects.append({"path": display_path(c.path), "reason": r[2], "kind": r[1], "label": c.label})
    rejects.sort(key=lambda r: r["path"])

    # summary numbers
    classes = sorted({r["label"] for r in rows} | {c.label for c in scan.candidates})
    counts = {k: 0 for k in classes}
    by_split: dict[str, dict[str, int]] = defaultdict(lambda: {k: 0 for k in classes})
    for r in rows:
        counts[r["label"]] += 1
        by_split[r["source_split"]][r["label"]] += 1
    sha_groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        sha_groups[r["sha256"]].append(r)
    dups = [g for g in sha_groups.values() if len(g) > 1]
    conflicts = [g for g in dups if len({r["label"] for r in g}) > 1]

    warnings: list[str] = list(scan.warnings)
    if rejects:
        kinds = Counter(r.get("kind", "") for r in rejects)
        warnings.append(
            f"{len(rejects)} file(s) rejected ({', '.join(f'{k}: {n}' for k, n in kinds.most_common())}); "
            f"reasons in {out / REJECTS_FILE}"
        )
    if scan.empty_classes:
        warnings.append(f"class folder(s) without images: {', '.join(scan.empty_classes)}")
    if conflicts:
        warnings.append(
            f"{len(conflicts)} identical file(s) (same sha256) carry different labels, e.g. "
            f"{', '.join(r['path'] for r in conflicts[0])}"
        )
    if cfg.patient_regex and pid_used["regex"] < len(rows):
        warnings.append(
            f"--patient-regex matched {pid_used['regex']} of {len(rows)} file names; the others use "
            "SOURCES.csv or their own path (one patient per image)"
        )
    if cfg.source_regex and src_used["regex"] < len(rows):
        warnings.append(
            f"--source-regex matched {src_used['regex']} of {len(rows)} paths; the others take their source from "
            "the root's name, SOURCES.csv or the root folder"
        )
    by_source: dict[str, dict[str, int]] = {}
    for r in rows:
        by_source.setdefault(r["source"], {k: 0 for k in classes})[r["label"]] += 1
    by_source = dict(sorted(by_source.items()))
    if rows and len(classes) < 2:
        warnings.append(f"only one class ({classes[0]}): a classifier needs at least two")

    out.mkdir(parents=True, exist_ok=True)
    manifest_path, rejects_path, summary_path = out / MANIFEST_FILE, out / REJECTS_FILE, out / INGEST_META_FILE
    _write_csv(manifest_path, MANIFEST_COLUMNS, rows)
    _write_csv(rejects_path, REJECT_COLUMNS, rejects)
    elapsed = time.perf_counter() - t0
    res = IngestResult(
        out=out,
        layout=scan.layout,
        classes=classes,
        counts=counts,
        counts_by_split={k: dict(v) for k, v in sorted(by_split.items())},
        n_candidates=len(scan.candidates) + len(scan.rejects),
        n_images=len(rows),
        n_rejected=len(rejects),
        n_duplicate=len(dups),
        n_duplicate_files=sum(len(g) for g in dups),
        n_ignored=len(scan.ignored),
        n_patients=len({r["patient_id"] for r in rows}),
        patient_id_sources={k: pid_used.get(k, 0) for k in ("csv", "regex", "SOURCES.csv", "path")},
        manifest_path=manifest_path,
        rejects_path=rejects_path,
        summary_path=summary_path,
        rejects=rejects,
        warnings=warnings,
        elapsed_s=elapsed,
        roots=roots,
        counts_by_source=by_source,
        source_from={k: src_used.get(k, 0) for k in ("csv", "regex", "name", "SOURCES.csv", "root")},
    )
    summary = {
        "src": str(src),
        "roots": [str(r) for r in roots],
        "out": str(out),
        "layout": res.layout,
        "root": str(scan.root or src),
        "classes": classes,
        "counts": counts,
        "counts_by_source_split": res.counts_by_split,
        "n_candidates": res.n_candidates,
        "n_images": res.n_images,
        "n_rejected": res.n_rejected,
        "rejects_by_kind": dict(Counter(r.get("kind", "") for r in rejects)),
        "n_duplicate_groups": res.n_duplicate,
        "n_duplicate_files": res.n_duplicate_files,
        "label_conflicts": [[r["path"] for r in g] for g in conflicts[:50]],
        "n_patients": res.n_patients,
        "patient_id_sources": res.patient_id_sources,
        "patient_regex": cfg.patient_regex,
        "n_sources": len(by_source),
        "counts_by_source": by_source,
        "source_from": res.source_from,
        "source_regex": cfg.source_regex,
        "source_column": cfg.source_column,
        "source_names": list(cfg.source_names),
        "sources_csv": [str(p) for p in scan.sources_csvs],
        "n_ignored": res.n_ignored,
        "ignored": scan.ignored,
        "warnings": warnings,
        "strict": cfg.strict,
        "workers": cfg.workers,
        "elapsed_s": round(elapsed, 3),
        "files": {"manifest": str(manifest_path), "rejects": str(rejects_path)},
    }
    write_json(summary_path, summary)
    if not rows:
        raise DataError(f"all {len(rejects)} candidate file(s) under {src} were rejected; reasons in {rejects_path}")
    if cfg.strict and rejects:
        raise IngestRejectsError(
            f"--strict: {len(rejects)} file(s) rejected; reasons in {rejects_path} "
            "(fix or remove them, or run without --strict to ingest the rest)",
            res,
        )
    return res
