"""What to evaluate: the image paths and labels of a run's own split, or of any folder of class folders or
manifest, with the data's class names mapped onto the model's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from cxrlab.data.classes import norm_class_name
from cxrlab.data.manifest import SPLIT_FILE, SPLIT_META_FILE, load_split, read_manifest
from cxrlab.errors import EvalError
from cxrlab.runs import (
    find_run_dir,
    read_run_config,
    read_summary,
)

# --------------------------------------------------------------------------------------------- items


@dataclass
class Items:
    """The images to evaluate: absolute paths and class names (already mapped onto the bundle's)."""

    paths: list[str]
    labels: list[str]
    source: str  # human-readable description of where the items came from
    dataset_version: str
    kind: Literal["split", "external"]
    sources: list[str] | None = None  # each image's source (hospital / collection) when the data records it


def map_class_names(names: list[str] | set[str], classes: list[str], where: str) -> dict[str, str]:
    """Map data class names onto the bundle's: exact, else case/punctuation-insensitive (``covid-19`` ->
    ``COVID19``). Unknown names raise EvalError listing the bundle's classes."""
    by_norm = {norm_class_name(c): c for c in classes}
    out, unknown = {}, []
    for n in sorted(set(names)):
        if n in classes:
            out[n] = n
        elif norm_class_name(n) in by_norm:
            out[n] = by_norm[norm_class_name(n)]
        else:
            unknown.append(n)
    if unknown:
        raise EvalError(
            f"{where}: class names {unknown} are not classes of the model ({', '.join(classes)}); "
            "rename them or evaluate a model trained on these classes"
        )
    return out


def _table_sources(df: pd.DataFrame) -> list[str] | None:
    from cxrlab.data.manifest import has_sources

    return df["source"].astype(str).tolist() if has_sources(df) else None


def _list_class_folders(root: Path, classes: list[str]) -> tuple[list[str], list[str]]:
    from cxrlab.data.io import IMAGE_EXTENSIONS

    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise EvalError(f"{root} has no class folders; pass a folder with one sub-folder per class or a manifest csv")
    split_like = {d.name.lower() for d in subdirs} & {"train", "val", "test"}
    if split_like and not ({norm_class_name(d.name) for d in subdirs} & {norm_class_name(c) for c in classes}):
        raise EvalError(
            f"{root} looks like a train/test layout ({', '.join(sorted(split_like))}); pass one of its class-folder "
            f"parents, e.g. {root / sorted(split_like)[0]}"
        )
    mapping = map_class_names([d.name for d in subdirs], classes, str(root))
    paths, labels = [], []
    for d in subdirs:
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += [str(p.resolve()) for p in files]
        labels += [mapping[d.name]] * len(files)
    return paths, labels


def _table_items(
    df: pd.DataFrame, base: Path, split: str, classes: list[str], where: str
) -> tuple[list, list, str, list[str] | None]:
    if "path" not in df.columns or "label" not in df.columns:
        raise EvalError(f"{where} needs 'path' and 'label' columns (a cxrlab manifest or split csv)")
    what = "all rows"
    if "split" in df.columns:
        sub = df[df["split"] == split]
        if sub.empty:
            have = sorted(df["split"].astype(str).unique())
            raise EvalError(f"{where} has no '{split}' rows (splits present: {', '.join(have)}); use --split")
        df, what = sub, f"split '{split}'"
    mapping = map_class_names(set(df["label"].astype(str)), classes, where)
    paths = [str(p if Path(p).is_absolute() else (base / p).resolve()) for p in df["path"].astype(str)]
    return paths, [mapping[str(v)] for v in df["label"]], what, _table_sources(df)


def _split_dataset_version(d: Path) -> str:
    meta = d / SPLIT_META_FILE
    if meta.is_file():
        try:
            return str(json.loads(meta.read_text()).get("dataset_version") or "unversioned")
        except json.JSONDecodeError:
            return "unversioned"
    return "unversioned"


def resolve_external_items(data: Path, split: str, classes: list[str]) -> Items:
    """Items from ``--data``: a folder of class folders, a split/manifest directory, or a csv."""
    data = Path(data)
    if not data.exists():
        raise EvalError(f"--data {data} does not exist; pass a folder of class folders or a manifest/split csv")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise EvalError(f"--data {data} is a file but not a csv; pass a folder of class folders or a csv")
        df = pd.read_csv(data, keep_default_na=False, dtype={"source": str})
        paths, labels, what, srcs = _table_items(df, data.parent, split, classes, str(data))
        return Items(paths, labels, f"{data} ({what})", _split_dataset_version(data.parent), "external", srcs)
    if (data / SPLIT_FILE).is_file():
        info = load_split(data)
        paths, labels, what, srcs = _table_items(info.table, data, split, classes, str(data / SPLIT_FILE))
        return Items(paths, labels, f"{data} ({what})", info.dataset_version, "external", srcs)
    if (data / "manifest.csv").is_file():
        df = read_manifest(data)
        paths, labels, what, srcs = _table_items(df, data, split, classes, str(data / "manifest.csv"))
        return Items(paths, labels, f"{data} ({what})", "unversioned", "external", srcs)
    from cxrlab.data.sources import folder_sources

    paths, labels = _list_class_folders(data, classes)
    srcs = folder_sources(data, paths)
    return Items(paths, labels, f"{data} (class folders)", "unversioned", "external", srcs)


def run_split_dir(run_dir: Path | None, summary: dict[str, Any], bundle_config: dict[str, Any]) -> Path | None:
    cands: list[str] = []
    if summary.get("data"):
        cands.append(str(summary["data"]))
    cfg = read_run_config(run_dir)
    if cfg.get("data"):
        cands.append(str(cfg["data"]))
    if bundle_config.get("data"):
        cands.append(str(bundle_config["data"]))
    for c in cands:
        p = Path(c)
        for q in (p, (run_dir / p) if run_dir is not None and not p.is_absolute() else None):
            if q is not None and ((q.is_dir() and (q / SPLIT_FILE).is_file()) or q.is_file()):
                return q
    if cands:
        raise EvalError(
            f"the split used for training ({cands[0]}) no longer exists; pass --data FOLDER_OR_MANIFEST "
            "to evaluate on other data"
        )
    return None


def resolve_items(
    target: Path, split: str, data: Path | None, classes: list[str], bundle_config: dict[str, Any]
) -> Items:
    """The items of an evaluation: ``data`` when given, else the run's own ``split``."""
    if data is not None:
        return resolve_external_items(data, split, classes)
    run_dir = find_run_dir(target)
    split_dir = run_split_dir(run_dir, read_summary(run_dir), bundle_config)
    if split_dir is None:
        raise EvalError(
            f"{target} does not record the split it was trained on; pass --data FOLDER_OR_MANIFEST "
            "(a folder of class folders, a manifest or a split csv)"
        )
    info = load_split(split_dir)
    sub = info.subset(split)
    if sub.empty:
        raise EvalError(f"split {info.root} has no '{split}' images; use --split val|test or --data")
    mapping = map_class_names(set(sub["label"].astype(str)), classes, str(info.root / SPLIT_FILE))
    paths = [str(p if Path(p).is_absolute() else (info.root / p).resolve()) for p in sub["path"].astype(str)]
    labels = [mapping[str(v)] for v in sub["label"]]
    return Items(paths, labels, f"{info.root} (split '{split}')", info.dataset_version, "split", _table_sources(sub))
