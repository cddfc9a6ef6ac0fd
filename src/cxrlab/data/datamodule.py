"""Dataset + LightningDataModule over a split, with a decoded-image cache.

Each item goes through one transform list (``cxrlab.transforms``: Resize -> ToChannels -> [random ops] ->
Normalize -> ToTensorV2) after decoding (``cxrlab.data.io.read_xray``) and preprocessing
(``cxrlab.preprocess.apply_preprocess``). The cache stores the output of the list's deterministic head (the resize,
``cxrlab.transforms.split_cached``) as uint8 in one shared-memory tensor: decoding and resizing are paid once per
run, not once per epoch, DataLoader workers read the same memory instead of copying it, and per item only the rest
of the list runs. Without the cache the whole list runs per item, exactly as inference runs it.

Randomness is a pure function of ``(cfg.seed, epoch, index)``: the train sampler's order and every item's
augmentation are drawn from generators seeded with those numbers (no global seed), so a run gives the same batches
whatever the number of workers, and a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cxrlab.config import Config, ConfigError
from cxrlab.data.io import read_xray
from cxrlab.data.manifest import ALL_SPLITS, DataError, SplitInfo, load_split
from cxrlab.preprocess import apply_preprocess
from cxrlab.transforms import cached_ops, norm_constants, split_cached

log = logging.getLogger(__name__)

STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def load_image(
    path: str | Path, preprocess: dict[str, Any] | None, head: Callable[..., dict[str, Any]] | None = None
) -> np.ndarray:
    """Decode -> preprocess -> (optionally) a transform list's deterministic ``head``: the 2-D uint8 image."""
    gray = apply_preprocess(read_xray(path), preprocess)
    return head(image=gray)["image"] if head is not None else gray


# ------------------------------------------------------------------------------------------------ cache


@dataclass
class ImageCache:
    """N decoded images through a transform list's deterministic ``head`` (by default the one of every list made by
    ``cxrlab.transforms``: the resize to ``img_size``), as one (N, H, W) uint8 tensor in shared memory.

    ``fill`` decodes everything up front (threads: OpenCV/PIL decoding releases the GIL) so unreadable images are
    found before training starts; their indices land in ``failed`` with the reason.
    """

    paths: list[str]
    img_size: tuple[int, int]
    preprocess: dict[str, Any] | None = None
    head: Callable[..., dict[str, Any]] | None = None
    data: torch.Tensor = field(init=False)
    failed: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import albumentations as A

        h, w = self.img_size
        if self.head is None:
            self.head = A.Compose(cached_ops(self.img_size))
        # share_memory_: forked and spawned DataLoader workers map the same pages instead of copying them.
        self.data = torch.empty((len(self.paths), h, w), dtype=torch.uint8).share_memory_()

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def fill(self, threads: int | None = None, progress: bool = True, desc: str = "caching images") -> ImageCache:
        from tqdm.auto import tqdm

        arr = self.data.numpy()

        def one(i: int) -> None:
            try:
                arr[i] = load_image(self.paths[i], self.preprocess, self.head)
            except (OSError, ValueError) as e:  # ImageReadError is a ValueError (CxrlabError)
                self.failed[i] = str(getattr(e, "reason", None) or e)

        workers = max(1, threads or os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(tqdm(pool.map(one, range(len(self.paths))), total=len(self.paths), desc=desc, disable=not progress))
        return self

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[i].numpy()


# ---------------------------------------------------------------------------------------------- dataset


class XrayDataset(Dataset):
    """Images + integer labels -> (CxHxW float tensor, label).

    Items are addressed by ``index`` or by ``(epoch, index)`` (what ``EpochSampler`` yields). With ``seed`` set, the
    transform's random state is seeded from ``(seed, epoch, index)`` before each item, so augmentation does not
    depend on worker count, worker seeding or how many items were drawn before.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable[..., dict[str, Any]],
        in_chans: int,
        img_size: tuple[int, int],
        preprocess: dict[str, Any] | None = None,
        cache: ImageCache | None = None,
        seed: int | None = None,
        sources: Sequence[str] | None = None,
        groups: Sequence[int] | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        if sources is not None and len(sources) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(sources)} sources")
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        # with a cache only the rest of the list runs per item: the cache holds the output of its head
        self.per_item = split_cached(transform)[1] if cache is not None else transform
        self.in_chans = in_chans
        self.img_size = img_size
        self.preprocess = preprocess
        self.cache = cache
        self.seed = seed
        # where each image comes from ("" when the split records no source): per-source metrics and sampling
        self.sources: list[str] = list(sources) if sources is not None else [""] * len(self.paths)
        # (source, class) group index per item for a group-robust loss: items are then (image, label, group)
        self.groups = np.asarray(groups, dtype=np.int64) if groups is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> np.ndarray:
        """The 2-D uint8 image at ``img_size`` (from the cache when there is one)."""
        if self.cache is not None:
            return self.cache[i]
        return load_image(self.paths[i], self.preprocess, split_cached(self.transform)[0])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, int]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        tf = self.per_item
        if self.seed is not None and hasattr(tf, "set_random_state"):
            # One generator shared by all ops (Compose.set_random_seed would give each op its own generator with
            # the same seed, correlating e.g. the flip and the zoom decisions).
            rng = np.random.default_rng([self.seed, epoch, i])
            tf.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        if self.cache is not None:
            out = tf(image=self.cache[i])
        else:
            out = tf(image=load_image(self.paths[i], self.preprocess))
        if self.groups is not None:
            return out["image"], int(self.labels[i]), int(self.groups[i])
        return out["image"], int(self.labels[i])


class EpochSampler(Sampler):
    """Training order as a pure function of ``(seed, epoch)``: a permutation, or a class-weighted draw with
    replacement when ``weights`` are given. Yields ``(epoch, index)`` so the dataset knows the epoch even inside a
    worker process that was started before ``set_epoch`` (Lightning calls ``set_epoch`` every epoch).

    Under torch.distributed each rank takes every ``world_size``-th item of the padded order.
    """

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None) -> None:
        self.n = n
        self.seed = seed
        self.weights = weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        _, world = self._world()
        return -(-self.n // world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch  # read lazily: the body runs at the first next(), after set_epoch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        rank, world = self._world()
        if world > 1:
            total = len(self) * world
            order = torch.cat([order, order[: total - self.n]])[rank:total:world]
        for i in order.tolist():
            yield epoch, i


# ------------------------------------------------------------------------------------------ datamodule


def resolve_split(data: str | Path | None) -> SplitInfo:
    """Load the split named by ``cfg.data`` with errors that say what to run."""
    if data is None:
        raise ConfigError(
            "no data given: pass --data SPLIT_DIR (from `cxrlab data split`) or set `data:` in the config"
        )
    p = Path(data).expanduser()
    if not p.exists():
        raise DataError(f"data path not found: {p} (pass a split directory made by `cxrlab data split`)")
    if p.is_dir() and not (p / "split.csv").is_file():
        hint = (
            "it holds a manifest: run `cxrlab data split " + str(p) + " --out SPLIT_DIR`"
            if (p / "manifest.csv").is_file()
            else "run `cxrlab data ingest " + str(p) + " --out MANIFEST_DIR` then `cxrlab data split MANIFEST_DIR`"
        )
        raise DataError(f"{p} is not a split directory (no split.csv); {hint}")
    return load_split(p)


def check_split(info: SplitInfo, evaluate: str = "val") -> None:
    """Fail early, with the path and what to do, on splits that cannot train: unknown labels, empty splits, a class
    without training images, missing files."""
    table, where = info.table, info.root / "split.csv"
    if not info.classes:
        raise DataError(f"{where} has no classes (is it empty?); re-run `cxrlab data split` on a non-empty manifest")
    unknown = sorted(set(table["label"]) - set(info.classes))
    if unknown:
        raise DataError(f"{where} has labels {unknown} that are not in split.json's classes {info.classes}")
    bad = sorted(set(table["split"]) - set(ALL_SPLITS))
    if bad:
        raise DataError(f"{where} has split values {bad}; expected {list(ALL_SPLITS)}")
    needed = ["train", "val"] + (["test"] if evaluate == "test" else [])
    for s in needed:
        if not (table["split"] == s).any():
            raise DataError(
                f"the {s} split in {where} is empty; re-run `cxrlab data split` with a non-zero {s} fraction"
            )
    train_counts = table[table["split"] == "train"]["label"].value_counts()
    empty = [c for c in info.classes if train_counts.get(c, 0) == 0]
    if empty:
        raise DataError(
            f"class {', '.join(empty)} has no training images in {where}; add images to that class or remove it "
            "from the data before splitting"
        )
    missing = [p for p in table["path"] if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) listed in {where} do not exist, e.g. {missing[0]}; re-run `cxrlab data ingest`"
        )


class CXRDataModule(L.LightningDataModule):
    """Train/val/test loaders over a split (see the module docstring for caching and seeding).

    ``mean``/``std`` default to ImageNet's for ``cfg.in_chans``; ``train`` passes the model's own
    (``cxrlab.training.model.model_data_config``) so the bundle's normalisation is the one trained with.
    """

    def __init__(
        self,
        cfg: Config,
        split_info: SplitInfo,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_split(split_info, cfg.evaluate)
        self.cfg = cfg
        self.info = split_info
        self.classes: list[str] = list(split_info.classes)
        if cfg.num_classes is not None and cfg.num_classes != len(self.classes):
            raise ConfigError(
                f"num_classes={cfg.num_classes} but the data has {len(self.classes)} classes {self.classes}; "
                "remove num_classes from the config (it is taken from the data)"
            )
        m, s = norm_constants(cfg.in_chans, *([mean, std] if mean is not None and std is not None else []))
        self.mean, self.std = m, s
        self.datasets: dict[str, XrayDataset] = {}
        self.skipped: dict[str, str] = {}  # unreadable image path -> reason
        self._sampler: EpochSampler | None = None

    # ---- facts about the data
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def table(self, split: str) -> pd.DataFrame:
        return self.info.subset(split)

    def class_counts(self, split: str = "train") -> list[int]:
        counts = self.table(split)["label"].value_counts()
        return [int(counts.get(c, 0)) for c in self.classes]

    def group_names(self) -> list[str]:
        """The (source, class) cells of the training split, as ``source/class`` (``/class`` without sources)."""
        tab = self.table("train")
        src = tab["source"].astype(str) if "source" in tab.columns else pd.Series([""] * len(tab), index=tab.index)
        return sorted(set(src + "/" + tab["label"].astype(str)))

    def _group_index(self, tab: pd.DataFrame) -> list[int]:
        names = {g: i for i, g in enumerate(self.group_names())}
        src = tab["source"].astype(str) if "source" in tab.columns else pd.Series([""] * len(tab), index=tab.index)
        return [names[g] for g in src + "/" + tab["label"].astype(str)]

    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency weights of the training classes, ``n / (k * count)`` (sklearn's "balanced"): every class
        carries the same total weight in the loss, and balanced data gets weight 1 everywhere."""
        counts = torch.tensor(self.class_counts("train"), dtype=torch.float32)
        return counts.sum() / (len(counts) * counts)

    # ---- building
    def _transform(self, train: bool) -> Callable[..., dict[str, Any]]:
        from cxrlab.transforms import eval_transform, train_transform

        cfg = self.cfg
        if train:
            return train_transform(cfg.img_size, self.mean, self.std, cfg.augment, cfg.seed, cfg.in_chans)
        return eval_transform(cfg.img_size, self.mean, self.std, cfg.in_chans)

    def build_dataset(self, split: str, progress: bool | None = None) -> XrayDataset:
        cfg = self.cfg
        tab = self.table(split)
        paths = tab["path"].astype(str).tolist()
        index = {c: i for i, c in enumerate(self.classes)}
        labels = [index[c] for c in tab["label"]]
        sources = tab["source"].astype(str).tolist() if "source" in tab.columns else None
        groups = self._group_index(tab) if split == "train" and cfg.loss == "groupdro" else None
        preprocess = cfg.preprocess.model_dump()
        transform = self._transform(train=split == "train")
        cache = None
        if cfg.cache_images:
            show = cfg.trainer.enable_progress_bar if progress is None else progress
            head = split_cached(transform)[0]
            cache = ImageCache(paths, cfg.img_size, preprocess, head).fill(cfg.threads, show, f"caching {split} images")
            if cache.failed:
                keep = [i for i in range(len(paths)) if i not in cache.failed]
                for i, reason in cache.failed.items():
                    self.skipped[paths[i]] = reason
                first = next(iter(cache.failed.items()))
                log.warning(
                    "skipped %d unreadable %s image(s), e.g. %s: %s",
                    len(cache.failed),
                    split,
                    paths[first[0]],
                    first[1],
                )
                if not keep:
                    raise DataError(f"no readable images in the {split} split of {self.info.root}")
                cache.data = cache.data[keep].clone().share_memory_()
                cache.paths = [paths[i] for i in keep]
                paths, labels = cache.paths, [labels[i] for i in keep]
                sources = [sources[i] for i in keep] if sources is not None else None
                groups = [groups[i] for i in keep] if groups is not None else None
                cache.failed = {}
        return XrayDataset(
            paths,
            labels,
            transform,
            cfg.in_chans,
            cfg.img_size,
            preprocess,
            cache,
            seed=cfg.seed if split == "train" else None,
            sources=sources,
            groups=groups,
        )

    def setup(self, stage: str | None = None) -> None:
        for split in STAGE_SPLITS.get(stage or "fit", ("train", "val", "test")):
            if split not in self.datasets:
                self.datasets[split] = self.build_dataset(split)

    def dataset(self, split: str) -> XrayDataset:
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        return self.datasets[split]

    # ---- loaders
    def _loader(self, ds: XrayDataset, sampler: Sampler | None = None, drop_last: bool = False) -> DataLoader:
        cfg = self.cfg
        return DataLoader(
            ds,
            batch_size=cfg.batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=drop_last,
            num_workers=cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def train_sampler(self) -> EpochSampler:
        ds = self.dataset("train")
        weights = None
        if self.cfg.imbalance == "sampler":
            per_class = 1.0 / torch.tensor(np.bincount(ds.labels, minlength=self.num_classes), dtype=torch.float64)
            weights = per_class[torch.from_numpy(ds.labels)]
        elif self.cfg.imbalance == "source":
            # every (source, class) cell is drawn equally often, however many images it holds
            cells = pd.Series([f"{s}/{y}" for s, y in zip(ds.sources, ds.labels, strict=True)])
            weights = torch.tensor(1.0 / cells.map(cells.value_counts()).to_numpy(), dtype=torch.float64)
        return EpochSampler(len(ds), self.cfg.seed, weights)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        sampler = self.train_sampler()
        trainer = self.trainer
        if trainer is not None:
            # Lightning creates the first iterator (and starts workers, which prefetch indices) before its own
            # set_epoch call; start at the restored epoch so a resumed run draws that epoch's order.
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
        self._sampler = sampler
        # A last batch of one sample breaks BatchNorm in training mode; drop it only in that case.
        drop_last = len(ds) > self.cfg.batch_size and len(ds) % self.cfg.batch_size == 1
        return self._loader(ds, sampler, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"))

    def loader(self, split: str) -> DataLoader:
        """The deterministic (eval-transform) loader of any split."""
        if split == "train":
            ds = self.dataset("train")
            ds = XrayDataset(
                ds.paths,
                ds.labels,
                self._transform(False),
                ds.in_chans,
                ds.img_size,
                ds.preprocess,
                ds.cache,
                sources=ds.sources,
            )
            return self._loader(ds)
        return self._loader(self.dataset(split))


def make_datamodule(
    cfg: Config, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> CXRDataModule:
    """``CXRDataModule`` over the split named by ``cfg.data``."""
    return CXRDataModule(cfg, resolve_split(cfg.data), mean, std)
