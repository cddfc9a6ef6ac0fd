"""Source-shift mitigations measured by leave-source-out validation (issue #15): one `cxrlab validate` per variant
on cxr-tiny + cxr-adult, in-distribution test and held-out-source metrics side by side.

    python benchmarks/bench_mitigations.py                                  # every variant, the default groups
    python benchmarks/bench_mitigations.py --variants baseline clahe --holdout hannover,nih --size 128 --epochs 2

Each variant is ``configs/cpu.yaml`` plus its ``--set`` overrides (below); all variants share the manifest, the
held-out groups, the split seed and the training budget, so the rows differ only by the mitigation. Results go to
``bench-out/mitigations/<variant>/`` (resumable: a finished fold is not retrained) and one table is printed:
macro-F1 on the in-distribution test split and on the held-out sources (pooled over the groups), accuracy and
per-class recall on the held-out sources, each with its 95% bootstrap CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CXRLAB_SHARED_DATA", REPO.parent / "shared" / "data"))

VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "source-balanced": ["imbalance=source"],
    "pad-resize": ["preprocess.pad_square=true"],
    "clahe": ["preprocess.intensity=clahe"],
    "lung-crop": ["preprocess.crop=lungs"],
    "groupdro": ["loss=groupdro"],
    "combined": ["imbalance=source", "preprocess.pad_square=true", "preprocess.intensity=clahe", "loss=groupdro"],
}
# two held-out groups that each hold all three classes: an unseen COVID-19 source with an unseen NORMAL/PNEUMONIA one
DEFAULT_GROUPS = ["hannover,nih", "ieee8023,kermany"]


def _cell(row: dict, key: str) -> str:
    v, lo, hi = row.get(key), row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if v is None or v != v:
        return "–"
    return f"{v:.3f} [{lo:.2f}, {hi:.2f}]" if lo == lo and hi == hi and lo is not None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--holdout", nargs="+", default=DEFAULT_GROUPS, help="source groups, comma-separated")
    ap.add_argument("--size", type=int, default=128, help="training image size (square)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "mitigations")
    args = ap.parse_args(argv)
    if not (DATA / "cxr-tiny").is_dir() or not (DATA / "cxr-adult").is_dir():
        print(f"skipped: {DATA}/cxr-tiny and cxr-adult are needed")
        return 0
    import logging

    from cxrlab.analysis.validate import ValidateConfig, validate
    from cxrlab.data.ingest import IngestConfig, ingest

    logging.getLogger("cxrlab.analysis.evaluate").setLevel(logging.ERROR)  # the shift warnings are in each fold's files

    t0 = time.perf_counter()
    manifest = args.out / "data"
    if not (manifest / "manifest.csv").is_file():
        ingest(IngestConfig(src=DATA / "cxr-tiny", extra_src=(DATA / "cxr-adult",), out=manifest, progress=False))
    common = [f"img_size=[{args.size},{args.size}]", f"epochs={args.epochs}", "tracking.wandb=off"]
    common.append("trainer.enable_progress_bar=false")
    rows = []
    for name in args.variants:
        res = validate(
            ValidateConfig(
                manifest=manifest,
                out=args.out / name,
                config=REPO / "configs" / "cpu.yaml",
                overrides=[*common, *VARIANTS[name]],
                groups=[g.split(",") for g in args.holdout],
                n_boot=args.n_boot,
                progress=False,
            ),
            log=lambda m: None,
        )
        pooled = res.rows[res.rows["fold"] == "pooled"].to_dict(orient="records")
        if not pooled:
            print(f"{name}: no fold finished")
            continue
        r = pooled[0]
        row = {"variant": name, "overrides": " ".join(VARIANTS[name]) or "(cpu.yaml)"}
        row["test macro-F1"] = _cell(r, "test_f1_macro")
        row["held-out macro-F1"] = _cell(r, "external_f1_macro")
        row["held-out accuracy"] = _cell(r, "external_accuracy")
        for c in res.classes:
            row[f"held-out recall {c}"] = _cell(r, f"external_recall_{c}")
        rows.append(row)
        print(f"{name}: done ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    if rows:
        cols = list(rows[0])
        print()
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|")
        for row in rows:
            print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    print(f"\nheld-out groups: {'; '.join(args.holdout)}; {args.size} px, {args.epochs} epochs; "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
