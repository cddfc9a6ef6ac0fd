"""Training throughput on real chest X-rays: cxrlab's pipeline vs a plain seed-style script, lever by lever.

Two ratios, measured side by side in one run (targets from issue 3):

* loader overhead: steps/s of the real ``CXRDataModule`` + ``CXRClassifier`` vs the same module fed pre-made
  batches (target >= 0.95);
* cxrlab vs the seed: steps/s of cxrlab's pipeline vs a plain seed-style script -- Lightning + timm +
  albumentations, ``cv2.imread`` + RGB + ``Resize -> HorizontalFlip -> Normalize -> ToTensorV2`` for every image
  every epoch, NCHW, OpenMP defaults -- with the same model, image size, batch size and threads (target >= 1.3x).

Each variant is one ``Trainer.fit`` of ``--steps`` timed training steps after one warm-up step, in a fresh
process (OpenMP settings only take effect before torch loads); the timed window covers loading + forward +
backward + optimizer step of each batch:

    seed          the seed-style script (OpenMP defaults: idle threads spin)
    nocache_nchw  cxrlab's datamodule decoding every image every step (grayscale read), NCHW
    cache_nchw    + decoded-image cache (images resized once to img_size, kept as uint8)
    cxrlab_spin   + channels_last
    cxrlab        + OMP_WAIT_POLICY=PASSIVE (idle threads sleep), as `cxrlab train` sets it: cxrlab's default
    cxrlab_t1     cxrlab with 1 thread instead of --threads
    premade       CXRClassifier (channels_last, PASSIVE) fed pre-made batches: the loader-overhead reference

The first four run with the OpenMP defaults, the last three with OMP_WAIT_POLICY=PASSIVE. Variants run
interleaved, round after round, and the median is reported, so load from other processes on this shared machine
hits all of them alike.
The one-time cost of filling the cache for the whole of cxr-tiny is reported separately.

    .venv/bin/python benchmarks/bench_train.py [--model efficientnet_lite0] [--size 192] [--batch 32]
        [--steps 4] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CXRLAB_SHARED_DATA", REPO.parent / "shared" / "data")) / "cxr-tiny"
VARIANTS = ("seed", "nocache_nchw", "cache_nchw", "cxrlab_spin", "cxrlab", "cxrlab_t1", "premade")
SPINNING = ("seed", "nocache_nchw", "cache_nchw", "cxrlab_spin")  # run with the OpenMP defaults


def _split_dir(n: int, out: Path) -> Path:
    """A split.csv over the first n/3 images of each cxr-tiny class (all 'train', 2 per class 'val')."""
    import pandas as pd

    rows = []
    classes = sorted(p.name for p in DATA.iterdir() if p.is_dir())
    for c in classes:
        files = sorted((DATA / c).glob("*.jpg"))[: -(-n // len(classes)) + 2]
        rows += [{"path": str(f), "label": c, "split": "train"} for f in files[:-2]]
        rows += [{"path": str(f), "label": c, "split": "val"} for f in files[-2:]]
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "split.csv", index=False)
    return out


def child(variant: str, args: argparse.Namespace) -> float:
    """Time one variant in this process; returns training steps/s."""
    import logging
    import warnings

    import albumentations as A
    import cv2
    import lightning as L
    import timm
    import torch
    import torchmetrics
    from albumentations.pytorch import ToTensorV2
    from torch.utils.data import DataLoader, Dataset

    from cxrlab.config import load_config
    from cxrlab.data.datamodule import CXRDataModule
    from cxrlab.data.manifest import load_split
    from cxrlab.training.module import CXRClassifier

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")  # Lightning's worker / logging-interval hints
    torch.set_num_threads(1 if variant == "cxrlab_t1" else args.threads)
    split = load_split(args.split)
    classes = split.classes
    size = (args.size, args.size)

    def cfg(*sets: str):
        return load_config(
            None,
            [
                f"model_name={args.model}",
                "pre_trained=false",  # speed does not depend on the weights
                f"img_size=[{args.size},{args.size}]",
                f"batch_size={args.batch}",
                "num_workers=0",
                f"data={split.root}",
                "tracking.wandb=off",
                "trainer.enable_progress_bar=false",
                *sets,
            ],
        )

    class SeedDataset(Dataset):
        def __init__(self, paths: list[str], labels: list[int]) -> None:
            self.paths, self.labels = paths, labels
            self.tf = A.Compose([A.Resize(*size), A.HorizontalFlip(p=0.5), A.Normalize(), ToTensorV2()])

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, i: int):
            img = cv2.cvtColor(cv2.imread(self.paths[i]), cv2.COLOR_BGR2RGB)
            return self.tf(image=img)["image"], self.labels[i]

    class SeedModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = timm.create_model(args.model, pretrained=False, num_classes=len(classes))
            self.loss = torch.nn.CrossEntropyLoss()
            self.acc = torchmetrics.Accuracy(task="multiclass", num_classes=len(classes))

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.model(x)
            loss = self.loss(logits, y)
            self.acc(logits, y)
            self.log("train_loss", loss, prog_bar=True)
            self.log("train_acc", self.acc, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=5e-6)

    if variant == "seed":
        tab = split.subset("train")
        module = SeedModule()
        data = {
            "train_dataloaders": DataLoader(
                SeedDataset(tab["path"].tolist(), [classes.index(c) for c in tab["label"]]),
                batch_size=args.batch,
                shuffle=True,
                num_workers=0,
            )
        }
    elif variant == "premade":
        g = torch.Generator().manual_seed(0)
        batches = [
            (torch.randn(args.batch, 3, *size, generator=g), torch.randint(0, len(classes), (args.batch,), generator=g))
            for _ in range(args.steps + 1)
        ]
        module = CXRClassifier(cfg(), classes)
        data = {"train_dataloaders": DataLoader(batches, batch_size=None)}
    else:
        sets = {"nocache_nchw": ("cache_images=false", "channels_last=false"), "cache_nchw": ("channels_last=false",)}
        dm = CXRDataModule(cfg(*sets.get(variant, ())), split)
        dm.setup("fit")  # the cache fill is a one-time cost, reported separately
        module = CXRClassifier(dm.cfg, classes)
        data = {"datamodule": dm}

    stamps: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_end(self, *a: object) -> None:
            stamps.append(time.perf_counter())

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=args.steps + 1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
    )
    trainer.fit(module, **data)
    return args.steps / (stamps[-1] - stamps[0])  # the steps after the warm-up step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--split", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"steps_per_s": child(args.child, args)}))
        return 0
    if not DATA.is_dir():
        print(f"skip: real data not found at {DATA}")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    split = _split_dir(args.batch * (args.steps + 1), tmp / "split")
    base_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    base_env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    common = ["--model", args.model, "--size", str(args.size), "--batch", str(args.batch)]
    common += ["--steps", str(args.steps), "--threads", str(args.threads), "--split", str(split)]

    def run(variant: str) -> float:
        env = dict(base_env) if variant in SPINNING else {**base_env, "OMP_WAIT_POLICY": "PASSIVE"}
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant, *common], env=env, capture_output=True, text=True
        )
        if out.returncode:
            raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
        return float(json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"])

    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            rates[v].append(run(v))
        print(f"round {r + 1}: " + ", ".join(f"{v} {rates[v][-1]:.3f}" for v in VARIANTS), flush=True)
    med = {v: statistics.median(x) for v, x in rates.items()}

    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    from cxrlab.data.datamodule import ImageCache

    paths = [str(p) for p in sorted(DATA.glob("*/*.jpg"))]
    t0 = time.perf_counter()
    ImageCache(paths, (args.size, args.size)).fill(threads=args.threads, progress=False)
    fill_s = time.perf_counter() - t0

    print()
    print(
        f"model {args.model}, {args.size}x{args.size}, batch {args.batch}, threads {args.threads} (cpu count "
        f"{os.cpu_count()}), {args.steps} timed steps x {args.rounds} rounds, median; fresh process per run"
    )
    print(f"{'variant':<14} {'steps/s':>8} {'img/s':>7}")
    for v in VARIANTS:
        print(f"{v:<14} {med[v]:8.3f} {med[v] * args.batch:7.1f}")
    print()
    print(f"loader overhead  cxrlab / premade            = {med['cxrlab'] / med['premade']:.3f}  (target >= 0.95)")
    print(f"cxrlab vs seed   cxrlab / seed               = {med['cxrlab'] / med['seed']:.2f}x (target >= 1.3x)")
    print(f"  lever grayscale decode  nocache_nchw / seed = {med['nocache_nchw'] / med['seed']:.2f}x")
    print(f"  lever cache             cache_nchw / nocache = {med['cache_nchw'] / med['nocache_nchw']:.2f}x")
    print(f"  lever channels_last     cxrlab_spin / cache  = {med['cxrlab_spin'] / med['cache_nchw']:.2f}x")
    print(f"  lever OMP passive wait  cxrlab / cxrlab_spin = {med['cxrlab'] / med['cxrlab_spin']:.2f}x")
    print(f"  threads 1 vs {args.threads}          cxrlab_t1 / cxrlab   = {med['cxrlab_t1'] / med['cxrlab']:.2f}x")
    print(
        f"cache fill (one-time): {len(paths)} cxr-tiny images in {fill_s:.1f} s "
        f"({fill_s / len(paths) * 1000:.1f} ms/image, {args.threads} threads)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
