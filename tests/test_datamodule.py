"""Contracts of cxrlab.data.datamodule: the cache equals the inference path, seeded augmentation, the epoch sampler,
bad splits fail early with what to do, unreadable images are skipped with their reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlab.config import ConfigError, load_config
from cxrlab.data.datamodule import CXRDataModule, EpochSampler, resolve_split
from cxrlab.data.io import read_xray
from cxrlab.data.manifest import DataError, load_split
from cxrlab.preprocess import apply_preprocess
from cxrlab.transforms import eval_transform, to_channels


def _cfg(split: Path, *sets: str):
    return load_config(
        None,
        [
            "model_name=test_efficientnet",
            "pre_trained=false",
            "img_size=[64,64]",
            "batch_size=8",
            f"data={split}",
            "trainer.enable_progress_bar=false",
            *sets,
        ],
    )


def _copy_split(src: Path, dst: Path, edit=None, meta_edit=None) -> Path:
    dst.mkdir(parents=True)
    table = pd.read_csv(src / "split.csv", keep_default_na=False)
    meta = json.loads((src / "split.json").read_text())
    if edit is not None:
        table = edit(table)
    if meta_edit is not None:
        meta = meta_edit(meta)
    table.to_csv(dst / "split.csv", index=False)
    (dst / "split.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("size", [64, 128])  # 96-px phantoms: shrunk and enlarged
def test_cached_items_equal_the_inference_preprocessing(phantom_split: Path, size: int) -> None:
    """What the model sees in validation is exactly what a bundle computes from the file (no train/serve drift)."""
    dm = CXRDataModule(_cfg(phantom_split, f"img_size=[{size},{size}]"), load_split(phantom_split))
    ds = dm.dataset("val")
    assert ds.cache is not None and tuple(ds.cache.data.shape[1:]) == (size, size)
    tf = eval_transform((size, size), dm.mean, dm.std)
    for i in range(len(ds)):
        x, y = ds[i]
        gray = apply_preprocess(read_xray(ds.paths[i]), {"text_removal": "none"})
        ref = tf(image=to_channels(gray, 3))["image"]
        assert torch.equal(x, ref), ds.paths[i]
        assert dm.classes[y] == Path(ds.paths[i]).parent.name


def test_uncached_dataset_gives_the_same_items(phantom_split: Path) -> None:
    cached = CXRDataModule(_cfg(phantom_split), load_split(phantom_split)).dataset("val")
    plain = CXRDataModule(_cfg(phantom_split, "cache_images=false"), load_split(phantom_split)).dataset("val")
    assert plain.cache is None
    assert all(torch.equal(cached[i][0], plain[i][0]) for i in range(len(plain)))


def test_train_augmentation_is_a_function_of_seed_epoch_and_index(phantom_split: Path) -> None:
    sets = ("augment.hflip_p=0.5", "augment.scale=[0.8,1.2]", "augment.p=1.0")
    ds = CXRDataModule(_cfg(phantom_split, *sets), load_split(phantom_split)).dataset("train")
    other_seed = CXRDataModule(_cfg(phantom_split, *sets, "seed=7"), load_split(phantom_split)).dataset("train")
    idx = range(8)
    first = [ds[(0, i)][0] for i in idx]
    assert all(torch.equal(a, ds[(0, i)][0]) for a, i in zip(first, idx, strict=True))  # repeatable, any order
    assert not all(torch.equal(a, ds[(1, i)][0]) for a, i in zip(first, idx, strict=True))  # new epoch, new draws
    assert not all(torch.equal(a, other_seed[(0, i)][0]) for a, i in zip(first, idx, strict=True))
    val = CXRDataModule(_cfg(phantom_split), load_split(phantom_split)).dataset("val")
    assert val.seed is None


def test_batches_do_not_depend_on_the_number_of_workers(phantom_split: Path) -> None:
    def first_batch(workers: int) -> torch.Tensor:
        dm = CXRDataModule(_cfg(phantom_split, f"num_workers={workers}"), load_split(phantom_split))
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(0), first_batch(2))


def test_epoch_sampler_orders_and_weights() -> None:
    s = EpochSampler(50, seed=3)
    s.set_epoch(0)
    e0 = [i for _, i in s]
    assert sorted(e0) == list(range(50))
    assert e0 == [i for _, i in s]  # same epoch, same order
    s.set_epoch(1)
    pairs = list(s)
    assert {e for e, _ in pairs} == {1} and [i for _, i in pairs] != e0
    labels = torch.tensor([0] * 900 + [1] * 100)
    w = (1.0 / torch.bincount(labels).double())[labels]
    drawn = labels[[i for _, i in EpochSampler(1000, seed=3, weights=w)]]
    assert 0.4 < drawn.float().mean().item() < 0.6  # minority class drawn about as often as the majority


def test_class_weights_and_weighted_sampler_on_imbalanced_data(phantom_split: Path, tmp_path: Path) -> None:
    def drop_covid_train(t: pd.DataFrame) -> pd.DataFrame:
        covid_train = t.index[(t["label"] == "COVID19") & (t["split"] == "train")][3:]
        return t.drop(covid_train)

    split = _copy_split(phantom_split, tmp_path / "imb", drop_covid_train)
    dm = CXRDataModule(_cfg(split, "imbalance=sampler"), load_split(split))
    counts = dm.class_counts("train")
    assert counts[0] == 3 and min(counts[1:]) > 3
    w = dm.class_weights()
    # sklearn's "balanced" weights n / (k * count): every class weighs the same in the loss in total
    total = torch.tensor(counts, dtype=torch.float32) * w
    assert torch.allclose(total, total[0].expand(3)) and torch.isclose(total.sum(), torch.tensor(float(sum(counts))))
    sampler = dm.train_sampler()
    assert sampler.weights is not None
    labels = dm.dataset("train").labels
    drawn = np.bincount(labels[[i for _, i in sampler]], minlength=3)
    assert drawn[0] > counts[0]  # the 3 COVID19 images are drawn more often than once


def _empty_train(t: pd.DataFrame) -> pd.DataFrame:
    return t[t["split"] != "train"]


def _no_covid(t: pd.DataFrame) -> pd.DataFrame:
    return t[t["label"] != "COVID19"]


def _missing_file(t: pd.DataFrame) -> pd.DataFrame:
    t = t.copy()
    t.loc[0, "path"] = "/nonexistent/img.png"
    return t


def _unknown_label(t: pd.DataFrame) -> pd.DataFrame:
    t = t.copy()
    t.loc[0, "label"] = "TUBERCULOSIS"
    return t


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_empty_train, "the train split in"),
        (_no_covid, "class COVID19 has no training images"),
        (_missing_file, "do not exist, e.g. /nonexistent/img.png"),
        (_unknown_label, "labels ['TUBERCULOSIS']"),
    ],
)
def test_unusable_splits_fail_with_what_to_do(phantom_split: Path, tmp_path: Path, edit, message: str) -> None:
    split = _copy_split(phantom_split, tmp_path / "bad", edit)
    with pytest.raises(DataError) as e:
        CXRDataModule(_cfg(split), load_split(split))
    assert message in str(e.value)


def test_data_paths_are_checked(tmp_path: Path, phantom_dir: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        resolve_split(tmp_path / "nope")
    with pytest.raises(DataError, match="cxrlab data ingest"):
        resolve_split(phantom_dir)  # a raw class-folder tree, not a split
    with pytest.raises(ConfigError, match="--data"):
        resolve_split(None)


def test_num_classes_must_match_the_data(phantom_split: Path) -> None:
    with pytest.raises(ConfigError, match="num_classes=2 but the data has 3 classes"):
        CXRDataModule(_cfg(phantom_split, "num_classes=2"), load_split(phantom_split))


def test_unreadable_image_is_skipped_with_its_reason(phantom_split: Path, tmp_path: Path) -> None:
    table = pd.read_csv(phantom_split / "split.csv", keep_default_na=False)
    victim = table[table["split"] == "train"]["path"].iloc[0]
    bad = tmp_path / "imgs" / Path(victim).name
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)

    def swap(t: pd.DataFrame) -> pd.DataFrame:
        t = t.copy()
        t.loc[t["path"] == victim, "path"] = str(bad)
        return t

    split = _copy_split(phantom_split, tmp_path / "corrupt", swap)
    dm = CXRDataModule(_cfg(split), load_split(split))
    ds = dm.dataset("train")
    assert len(ds) == (table["split"] == "train").sum() - 1
    assert str(bad) in dm.skipped and dm.skipped[str(bad)]
    shutil.rmtree(tmp_path / "imgs")
