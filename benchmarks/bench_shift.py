"""Shift warnings measured on a model trained on cxr-tiny (issue #15's acceptance, one table).

    python benchmarks/bench_shift.py                      # trains one with configs/cpu.yaml into bench-out/shift/
    python benchmarks/bench_shift.py --run runs/<id>      # or measures an existing cxr-tiny run

For the model: its own test split (no label-shift or collapse warning may fire; share of images flagged out of
distribution), cxr-adult (the label-shift and collapse warnings; per source), and a foreign set of 16 inputs no
chest X-ray model should trust: scikit-learn's two sample photos and their 90-degree rotations, 4 noise images,
3 constant images and 5 inverted cxr-tiny test images (share flagged, and by the feature score alone).
Needs ../shared/data (cxr-tiny, cxr-adult); skips with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CXRLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def foreign_set(out: Path, test_paths: list[str]) -> Path:
    """The 16 foreign inputs (see the module doc) as image files in ``out``."""
    from sklearn.datasets import load_sample_images

    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(load_sample_images().images):
        cv2.imwrite(str(out / f"photo{i}.jpg"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
        cv2.imwrite(
            str(out / f"photo{i}_rot90.jpg"), cv2.cvtColor(np.ascontiguousarray(np.rot90(im)), cv2.COLOR_RGB2BGR)
        )
    rng = np.random.default_rng(0)
    cv2.imwrite(str(out / "noise_uniform.png"), rng.integers(0, 256, (256, 256), dtype=np.uint8))
    cv2.imwrite(str(out / "noise_normal.png"), np.clip(rng.normal(128, 40, (320, 320)), 0, 255).astype(np.uint8))
    cv2.imwrite(str(out / "noise_rgb.png"), rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    blur = cv2.GaussianBlur(rng.integers(0, 256, (256, 256), dtype=np.uint8), (0, 0), 4)
    cv2.imwrite(str(out / "noise_blurred.png"), cv2.normalize(blur, None, 0, 255, cv2.NORM_MINMAX))
    for v in (0, 128, 255):
        cv2.imwrite(str(out / f"constant_{v}.png"), np.full((224, 224), v, np.uint8))
    for i, p in enumerate(sorted(test_paths)[:: max(1, len(test_paths) // 5)][:5]):
        cv2.imwrite(str(out / f"inverted_{i}.png"), 255 - cv2.imread(p, cv2.IMREAD_GRAYSCALE))
    return out


def train_tiny(base: Path) -> Path:
    """A cxr-tiny run with configs/cpu.yaml (reused when bench-out/shift/run already holds one)."""
    from cxrlab.config import load_config
    from cxrlab.data.ingest import IngestConfig, ingest
    from cxrlab.data.split import SplitConfig, split
    from cxrlab.training.train import train

    run = base / "runs" / "tiny"
    if (run / "summary.json").is_file():
        return run
    ingest(IngestConfig(src=DATA / "cxr-tiny", out=base / "data", progress=False))
    split(SplitConfig(manifest=base / "data", out=base / "split", progress=False))
    sets = [f"data={base / 'split'}", f"output_dir={base / 'runs'}", "run_name=tiny", "tracking.wandb=off"]
    return train(load_config(REPO / "configs" / "cpu.yaml", [*sets, "trainer.enable_progress_bar=false"])).run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a run trained on cxr-tiny (default: train one)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "shift")
    ap.add_argument("--n-boot", type=int, default=200)
    args = ap.parse_args(argv)
    if not (DATA / "cxr-tiny").is_dir() or not (DATA / "cxr-adult").is_dir():
        print(f"skipped: {DATA}/cxr-tiny and cxr-adult are needed")
        return 0
    from cxrlab.analysis.evaluate import EvalConfig, evaluate
    from cxrlab.analysis.ood import load_scorer
    from cxrlab.inference.predict import Predictor
    from cxrlab.runs import find_run_dir, read_summary

    t0 = time.perf_counter()
    run = args.run or train_tiny(args.out)
    if load_scorer(run / "bundle", json.loads((run / "bundle" / "bundle.json").read_text())) is None:
        from cxrlab.analysis.shift_fit import fit_bundle

        fit_bundle(run)  # a run trained before shift statistics existed
    rows = []
    own = evaluate(EvalConfig(target=run, n_boot=args.n_boot, progress=False, wandb="off"))
    adult = evaluate(EvalConfig(target=run, data=DATA / "cxr-adult", n_boot=args.n_boot, progress=False, wandb="off"))
    for name, e in (("own test split", own), ("cxr-adult", adult)):
        ls, col = e.shift["label_shift"], e.shift["collapse"]
        rows.append(
            {
                "data": name,
                "n": e.n,
                "macro-F1": round(e.metrics[f"{e.prefix}/f1_macro"], 3),
                "label-shift warning": ls["shifted"],
                "label-shift p": f"{ls['p_value']:.2g}",
                "collapse warning": col["collapsed"],
                "collapse onto": col["onto"] if col["collapsed"] else "",
                "flagged OOD": f"{e.shift['ood']['n_flagged']}/{e.n}",
            }
        )
    split_dir = Path(read_summary(find_run_dir(run)).get("data", ""))
    test = pd.read_csv(split_dir / "split.csv")
    fset = foreign_set(args.out / "foreign", test.loc[test["split"] == "test", "path"].tolist())
    preds = Predictor(run, progress=False).predict([fset])
    by_feature = sum(p.ood_score is not None and p.ood_score > 1 for p in preds)
    rows.append(
        {
            "data": "foreign set",
            "n": len(preds),
            "flagged OOD": f"{sum(bool(p.ood) for p in preds)}/{len(preds)} (feature score alone {by_feature})",
        }
    )
    table = pd.DataFrame(rows).astype(object).fillna("")
    print(table.to_string(index=False))
    print()
    cols = ["source", "n", "accuracy", *(c for c in adult.per_source if c.startswith("predicted_"))]
    per_source = adult.per_source[cols]
    print(per_source.to_string(index=False))  # whole: a wide frame's repr elides the middle columns
    for w in adult.warnings:
        print("cxr-adult warning:", w)
    for p in preds:
        if not p.ood:
            print("not flagged:", Path(p.path).name)
    print(f"\nrun {run}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
