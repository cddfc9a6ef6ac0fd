"""Training throughput on real chest X-rays: cxrlab's pipeline vs a plain seed-style script, lever by lever.

Two ratios (targets from issue 3), each printed as min / median / max over interleaved rounds:

* loader overhead: steps/s of the real ``CXRDataModule`` + ``CXRClassifier`` vs the *same* module in the *same*
  process fed the same batches already collated in memory (on the device) -- the reference does the same
  forward/backward/optimizer work minus the loading, so it is an upper bound by construction (target >= 0.95).
  Measured *paired*: one fit whose batches alternate, step by step, between the real loader and pre-made
  batches; the ratio is the mean step interval without a fetch over the mean interval with one. Both halves
  run at the same moment, so background load and drift cancel (two chunks of 8 steps timed a minute apart, the
  earlier way, gave medians 1.005 and 1.139 in two runs on a quiet machine: noise larger than the effect);
* cxrlab vs the seed: steps/s of cxrlab's pipeline vs a plain seed-style script -- Lightning + timm +
  albumentations, ``cv2.imread`` + RGB + ``Resize -> HorizontalFlip -> Normalize -> ToTensorV2`` for every image
  every epoch, NCHW, OpenMP defaults -- with the same model, image size, batch size and threads (target >= 1.3x).

Variants, one worker process per OpenMP setting (OMP_WAIT_POLICY only takes effect before torch loads):

    seed          the seed-style script (OpenMP defaults: idle threads spin)
    cxrlab        cxrlab's datamodule + module as `cxrlab train` runs them: decoded-image cache (grayscale read,
                  resized once to img_size, kept as uint8), channels_last, OMP_WAIT_POLICY=PASSIVE
    paired        in cxrlab's worker: real-loader and pre-made batches alternating in one fit (the loader overhead)
  with --levers, the steps between the two:
    nocache_nchw  cxrlab's datamodule decoding every image every step (grayscale read), NCHW, OpenMP defaults
    cache_nchw    + decoded-image cache
    cxrlab_spin   + channels_last (cxrlab is this + OMP_WAIT_POLICY=PASSIVE)
    premade       in cxrlab's worker: the same module fed pre-made batches (chunk-level loader reference)
    cxrlab_t1     in cxrlab's worker: cxrlab with 1 thread instead of --threads

Every round starts fresh worker processes, one at a time (each builds its model and data, runs its chunks, and
exits), in an order reversed on alternate rounds. Fresh processes because a process's speed is partly its own:
with long-lived workers the seed-style one ran at 0.48 steps/s through all 5 rounds of one run and at 0.61
through all 5 of the next, so the medians of cxrlab vs seed in four quiet runs were 1.61, 1.49, 1.63 and 1.17x;
one process per run is one sample, however many rounds it runs. A chunk is one ``Trainer.fit`` of ``--steps``
timed training steps after one untimed warm-up step; the timed window covers loading + forward + backward +
optimizer step of each batch. Each ratio is computed within a round. The load average is printed before and after.

    .venv/bin/python benchmarks/bench_train.py [--model efficientnet_lite0] [--size 192] [--batch 32]
        [--steps 8] [--rounds 9] [--threads 2] [--levers]

Cost on 2 quiet cores: about 65 s per round (two process starts of ~5 s, 8 + 8 + 16 timed steps of 0.7-1.5 s):
~10 minutes for the defaults; --levers about doubles it.
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
# worker -> the variants it runs, in this order, in one fresh process per round
WORKERS = {"seed": ("seed",), "cxrlab": ("cxrlab", "paired")}
# --levers: the steps between the two, one worker each (the first three keep the OpenMP defaults: spinning)
LEVER_WORKERS = {"nocache_nchw": ("nocache_nchw",), "cache_nchw": ("cache_nchw",), "cxrlab_spin": ("cxrlab_spin",)}
LEVER_VARIANTS = ("premade", "cxrlab_t1")  # also in cxrlab's worker, after its own two
PASSIVE = ("cxrlab",)


def plan(levers: bool) -> dict[str, tuple[str, ...]]:
    """worker -> its variants, in the order a round runs them."""
    if not levers:
        return dict(WORKERS)
    return {"seed": WORKERS["seed"], **LEVER_WORKERS, "cxrlab": WORKERS["cxrlab"] + LEVER_VARIANTS}


RESULT = "@@bench_train "


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


def child(worker: str, args: argparse.Namespace) -> None:
    """Build one worker's model and data, then run a timed chunk for each ``run VARIANT`` line on stdin."""
    import logging
    import warnings
    from itertools import islice

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
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")  # Lightning's worker / logging-interval hints
    torch.set_num_threads(args.threads)
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

    if worker == "seed":
        tab = split.subset("train")
        module = SeedModule()
        loader = DataLoader(
            SeedDataset(tab["path"].tolist(), [classes.index(c) for c in tab["label"]]),
            batch_size=args.batch,
            shuffle=True,
            num_workers=0,
        )
        data = {"seed": {"train_dataloaders": loader}}
    else:
        sets = {"nocache_nchw": ("cache_images=false", "channels_last=false"), "cache_nchw": ("channels_last=false",)}
        dm = CXRDataModule(cfg(*sets.get(worker, ())), split)
        dm.setup("fit")  # the cache fill is a one-time cost, reported separately
        module = CXRClassifier(dm.cfg, classes)
        data = {v: {"datamodule": dm} for v in plan(args.levers)[worker]}
        if worker == "cxrlab":
            # the reference: this datamodule's own batches, collated once and held in memory (on the device: CPU)
            batches = list(islice(iter(dm.train_dataloader()), args.steps + 1))
            data["premade"] = {"train_dataloaders": DataLoader(batches, batch_size=None)}

    fetches: list[float] = []  # when each real-loader fetch of a paired chunk started

    class Alternating:
        """Real-loader batches and pre-made batches taking turns, step by step, in one fit: every other step's
        interval holds a real fetch. Same process, same model, same moment: the pair differs only in loading."""

        def __init__(self, dm, made: list, n: int) -> None:
            self.dm, self.made, self.n = dm, made, n

        def __iter__(self):
            real = iter(self.dm.train_dataloader())
            for i in range(self.n):
                if i % 2 == 0:
                    fetches.append(time.perf_counter())
                    yield next(real)
                else:
                    yield self.made[(i // 2) % len(self.made)]

    if worker == "cxrlab":
        data["paired"] = {"train_dataloaders": Alternating(dm, batches, 2 * args.steps + 1)}

    def chunk(variant: str) -> float:
        stamps: list[float] = []

        class Timer(L.Callback):
            def on_train_batch_end(self, *a: object) -> None:
                stamps.append(time.perf_counter())

        torch.set_num_threads(1 if variant == "cxrlab_t1" else args.threads)
        n = 2 * args.steps + 1 if variant == "paired" else args.steps + 1
        fetches.clear()
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_train_batches=n,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Timer()],
        )
        trainer.fit(module, **data[variant])
        if len(stamps) != n:
            raise RuntimeError(f"{variant}: {len(stamps)} steps ran, expected {n}")
        if variant == "paired":
            # loader overhead = steps/s with loading / steps/s without = mean interval without / mean with a fetch
            with_fetch, without = [], []
            for a, b in zip(stamps, stamps[1:], strict=False):
                (with_fetch if any(a <= f < b for f in fetches) else without).append(b - a)
            if not with_fetch or not without:
                raise RuntimeError(f"paired: {len(with_fetch)} intervals with a fetch, {len(without)} without")
            return statistics.fmean(without) / statistics.fmean(with_fetch)
        return args.steps / (stamps[-1] - stamps[0])  # the steps after the warm-up step

    print(RESULT + json.dumps({"ready": worker}), flush=True)
    for line in sys.stdin:
        cmd, _, variant = line.strip().partition(" ")
        if cmd != "run":
            break
        print(RESULT + json.dumps({"variant": variant, "steps_per_s": chunk(variant)}), flush=True)


class Worker:
    """A child process running one worker; ``run(variant)`` returns steps/s of one chunk."""

    def __init__(self, name: str, common: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", name, *common],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),  # noqa: SIM115 (lives with the process)
            text=True,
        )

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT) :])
        raise RuntimeError(f"worker {self.name} exited with {self.proc.wait()}:\n{self.log.read_text()[-3000:]}")

    def ready(self) -> None:
        self._read()

    def run(self, variant: str) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {variant}\n")
        self.proc.stdin.flush()
        return float(self._read()["steps_per_s"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def spread(xs: list[float], digits: int = 3, unit: str = "") -> str:
    return (
        f"{statistics.median(xs):.{digits}f}{unit} (min {min(xs):.{digits}f}, max {max(xs):.{digits}f})" if xs else "-"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per variant and round")
    ap.add_argument("--rounds", type=int, default=9, help="rounds, each in fresh worker processes")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--levers", action="store_true", help="also time the steps between the seed and cxrlab")
    ap.add_argument("--child", choices=tuple(plan(levers=True)), help=argparse.SUPPRESS)
    ap.add_argument("--split", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args)
        return 0
    if not DATA.is_dir():
        print(f"skip: real data not found at {DATA}")
        return 0

    load_start = os.getloadavg()
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    split = _split_dir(args.batch * (args.steps + 1), tmp / "split")
    base_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    base_env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    common = ["--model", args.model, "--size", str(args.size), "--batch", str(args.batch)]
    common += ["--steps", str(args.steps), "--threads", str(args.threads), "--split", str(split)]
    common += ["--levers"] if args.levers else []

    workers = plan(args.levers)
    variants = tuple(v for vs in workers.values() for v in vs)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    t_setup = 0.0
    for r in range(args.rounds):
        # fresh processes every round, one at a time: a process's speed is partly its own (the seed-style worker
        # ran at 0.48 steps/s all through one run and 0.61 all through the next), so each round samples anew
        for name in list(workers) if r % 2 == 0 else list(workers)[::-1]:
            env = {**base_env, "OMP_WAIT_POLICY": "PASSIVE"} if name in PASSIVE else dict(base_env)
            t0 = time.perf_counter()
            w = Worker(name, common, env, tmp / f"{name}-{r + 1}.log")
            try:
                w.ready()
                t_setup += time.perf_counter() - t0
                for v in workers[name]:
                    rates[v].append(w.run(v))
            finally:
                w.close()
        print(f"round {r + 1}: " + ", ".join(f"{v} {rates[v][-1]:.3f}" for v in variants), flush=True)
    t_rounds = time.perf_counter() - t_start - t_setup
    load_end = os.getloadavg()

    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    from cxrlab.data.datamodule import ImageCache

    paths = [str(p) for p in sorted(DATA.glob("*/*.jpg"))]
    t0 = time.perf_counter()
    ImageCache(paths, (args.size, args.size)).fill(threads=args.threads, progress=False)
    fill_s = time.perf_counter() - t0

    def ratio(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(rates[a], rates[b], strict=True)]

    load = max(load_start[0], load_end[0])
    print()
    print(
        f"model {args.model}, {args.size}x{args.size}, batch {args.batch}, threads {args.threads} (cpu count "
        f"{os.cpu_count()}), {args.steps} timed steps per variant x {args.rounds} interleaved rounds "
        f"({args.steps * args.rounds} timed steps per variant), fresh worker processes every round; process starts "
        f"{t_setup:.0f} s, timed chunks {t_rounds:.0f} s"
    )
    print(
        f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end on {os.cpu_count()} cores"
        + ("" if load < 2 else ": MEASURED UNDER LOAD (other processes held the cores)")
    )
    print(f"{'variant':<14} {'steps/s: median (min, max)':>34} {'img/s':>7}")
    for v in variants:
        if v != "paired":  # a ratio, printed below
            print(f"{v:<14} {spread(rates[v]):>34} {statistics.median(rates[v]) * args.batch:7.1f}")
    print()
    print("ratios, each within a round: median (min, max) over rounds")
    lines = [
        ("loader overhead  paired steps in one fit     ", rates["paired"], 3, "", "  (target >= 0.95)"),
        ("cxrlab vs seed   cxrlab / seed               ", ratio("cxrlab", "seed"), 2, "x", "  (target >= 1.3x)"),
    ]
    lines += (
        [
            ("  loader overhead chunk by chunk: cxrlab / premade", ratio("cxrlab", "premade"), 3, "", ""),
            ("  lever grayscale decode  nocache_nchw / seed ", ratio("nocache_nchw", "seed"), 2, "x", ""),
            ("  lever cache             cache_nchw / nocache", ratio("cache_nchw", "nocache_nchw"), 2, "x", ""),
            ("  lever channels_last     cxrlab_spin / cache ", ratio("cxrlab_spin", "cache_nchw"), 2, "x", ""),
            ("  lever OMP passive wait  cxrlab / cxrlab_spin", ratio("cxrlab", "cxrlab_spin"), 2, "x", ""),
            (f"  threads 1 vs {args.threads}          cxrlab_t1 / cxrlab  ", ratio("cxrlab_t1", "cxrlab"), 2, "x", ""),
        ]
        if args.levers
        else []
    )
    for label, xs, digits, unit, target in lines:
        print(f"{label} = {spread(xs, digits, unit)}{target}")
    print(
        f"cache fill (one-time): {len(paths)} cxr-tiny images in {fill_s:.1f} s "
        f"({fill_s / len(paths) * 1000:.1f} ms/image, {args.threads} threads)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
