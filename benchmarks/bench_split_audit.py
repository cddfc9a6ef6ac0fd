"""Split + audit on the real data, with the issue's acceptance checks.

cxr-full (6,378 images): ingest -> split -> audit end to end, timed (wall and CPU, the CPU figure counts the
audit's worker processes) with the checks: per-class train/val/test within one image of 80/10/10; no patient
id, sha256 or pHash near-duplicate group crosses splits; the same seed gives byte-identical split files (and a
different seed another dataset version); ``per_class=500`` gives 500 per class. cxr-tiny (1,500): the audit's
confound score and the text/marker share per class.

Run: ``.venv/bin/python benchmarks/bench_split_audit.py [--shared ../shared/data] [--workers 2]``.
Exit status 1 when an acceptance check fails.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Timer:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> Timer:
        self.w0, self.c0 = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = _cpu() - self.c0
        print(f"  {self.name}: {self.wall:.1f} s wall, {self.cpu:.1f} s CPU", flush=True)


def check(ok: bool, what: str, failures: list[str]) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
    if not ok:
        failures.append(what)


def full(data: Path, tmp: Path, workers: int, progress: bool, failures: list[str]) -> None:
    from cxrlab.data.audit import AuditConfig, audit
    from cxrlab.data.ingest import IngestConfig, ingest
    from cxrlab.data.split import SplitConfig, split

    print(f"cxr-full: {data}  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)
    with Timer("ingest") as ti:
        ing = ingest(IngestConfig(src=data, out=tmp / "ingest", workers=workers, progress=progress))
    with Timer("split") as ts:
        res = split(SplitConfig(manifest=tmp / "ingest", out=tmp / "split", seed=42, progress=progress))
    with Timer("audit") as ta:
        aud = audit(AuditConfig(data=tmp / "split", out=tmp / "audit", workers=workers, progress=progress))
    total_w, total_c = ti.wall + ts.wall + ta.wall, ti.cpu + ts.cpu + ta.cpu
    print(f"  ingest + split + audit: {total_w:.1f} s wall, {total_c:.1f} s CPU ({total_c / 2:.1f} s per core on 2)")
    check(ing.n_images == 6378 and ing.n_rejected == 0, f"ingest 6,378 images, 0 rejects ({ing.counts})", failures)
    print(f"  dataset version {res.dataset_version}, {res.n_groups} groups, {res.n_near_dup_pairs} pHash pairs")
    worst = 0.0
    for c, per in res.counts.items():
        n = sum(per.values())
        dev = max(abs(per[s] - n * f) for s, f in FRACTIONS.items())
        worst = max(worst, dev)
        print(f"    {c}: {per} (n={n}, max deviation from 80/10/10 {dev:.1f} images)")
    check(worst <= 1.0, "every class within one image of 80/10/10", failures)
    t = pd.read_csv(res.split_path, dtype=str, keep_default_na=False)
    for key in ("patient_id", "sha256", "group"):
        crossing = int((t.groupby(key)["split"].nunique() > 1).sum())
        check(crossing == 0, f"no {key} crosses splits ({crossing} do)", failures)
    dup = pd.read_csv(aud.duplicates_path, keep_default_na=False)
    n_cross = int((dup["cross_split"].astype(str) == "True").sum())
    check(
        n_cross == 0,
        f"no exact/near-duplicate pair crosses splits (audit: {len(dup)} pairs, {n_cross} across)",
        failures,
    )
    res2 = split(SplitConfig(manifest=tmp / "ingest", out=tmp / "split2", seed=42, progress=False))
    same = all(
        (tmp / "split" / f).read_bytes() == (tmp / "split2" / f).read_bytes() for f in ("split.csv", "split.json")
    )
    check(same and res2.dataset_version == res.dataset_version, "same seed -> byte-identical split files", failures)
    res3 = split(SplitConfig(manifest=tmp / "ingest", out=tmp / "split3", seed=7, progress=False))
    check(res3.dataset_version != res.dataset_version, f"seed 7 -> another version ({res3.dataset_version})", failures)
    sub = split(SplitConfig(manifest=tmp / "ingest", out=tmp / "tiny", per_class=500, seed=42, progress=False))
    per = {c: sum(v.values()) for c, v in sub.counts.items()}
    check(all(v == 500 for v in per.values()), f"per_class=500 -> {per}", failures)
    _print_audit(aud)


def tiny(data: Path, tmp: Path, workers: int, progress: bool, failures: list[str]) -> None:
    from cxrlab.data.audit import AuditConfig, audit
    from cxrlab.data.ingest import IngestConfig, ingest

    print(f"cxr-tiny: {data}", flush=True)
    ingest(IngestConfig(src=data, out=tmp / "tiny-ingest", workers=workers, progress=progress))
    with Timer("audit"):
        aud = audit(AuditConfig(data=tmp / "tiny-ingest", out=tmp / "tiny-audit", workers=workers, progress=progress))
    _print_audit(aud)
    size = aud.confound["groups"]["image size/aspect"]
    chance = aud.confound["chance_balanced_accuracy"]
    check(
        any(w.startswith("image size/aspect") for w in aud.warnings),
        f"confound score flags image size/aspect ({size['balanced_accuracy']:.2f} vs chance {chance:.2f})",
        failures,
    )
    print(
        "  note: the literal check 'text in a visibly larger share of COVID19 than NORMAL' is "
        f"{'met' if aud.text_share['COVID19'] > aud.text_share['NORMAL'] + 0.1 else 'NOT met'}: "
        f"COVID19 {aud.text_share['COVID19']:.0%} vs NORMAL {aud.text_share['NORMAL']:.0%}"
    )


def _print_audit(aud) -> None:
    import json

    s = json.loads(Path(aud.json_path).read_text())
    c = s["confound"]
    if "all" in c:
        print(
            f"  confound score: balanced accuracy {c['all']['balanced_accuracy']:.3f}, accuracy "
            f"{c['all']['accuracy']:.3f} (chance {c['chance_balanced_accuracy']:.3f} / {c['chance_accuracy']:.3f})"
        )
        for g, v in c["groups"].items():
            print(f"    {g}: balanced accuracy {v['balanced_accuracy']:.3f}, recall {v['recall']}")
    for cl, d in s["per_class"].items():
        print(
            f"    {cl}: text/marker share {d['text_share']:.1%}, 2+ glyphs {d['text_multi_share']:.1%}, "
            f"glyphs/image {d['text_glyphs_mean']:.2f}"
        )
    print(f"  flags: {s['flag_counts']}; duplicates: {s['duplicates']}")
    for w in s["warnings"]:
        print(f"  warning: {w}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, fn in (("cxr-full", full), ("cxr-tiny", tiny)):
            p = args.shared / name
            if p.is_dir():
                fn(p, tmp, args.workers, not args.no_progress, failures)
            else:
                print(f"skip {name}: {p} not found")
    if failures:
        print("FAILED:", "; ".join(failures))
        return 1
    print("all acceptance checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
