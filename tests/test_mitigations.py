"""Contracts of the source-shift mitigations: preprocessing steps that travel in the bundle (lung crop, pad to
square, intensity standardisation), the source-balanced sampler and the GroupDRO loss."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import TEST_MODEL, TEST_SEED
from cxrlab.config import Config, load_config
from cxrlab.preprocess import apply_preprocess, crop_to_lungs, pad_to_square, standardise_intensity


def test_preprocessing_steps(cxr_tiny: Path) -> None:
    g = cv2.imread(str(sorted((cxr_tiny / "COVID19").iterdir())[3]), cv2.IMREAD_GRAYSCALE)
    assert apply_preprocess(g, {"text_removal": "none"}) is g  # a bundle saved before the new steps: unchanged
    c = crop_to_lungs(g)
    assert c.shape[0] <= g.shape[0] and c.shape[1] <= g.shape[1] and c.size >= 0.2 * g.size
    rect = np.zeros((40, 100), np.uint8)
    rect[:, 30:70] = 200
    sq = pad_to_square(rect)
    assert sq.shape == (100, 100) and sq[30:70].sum() == rect.sum() and sq[:30].max() == 0
    dark = (g // 4).astype(np.uint8)
    for mode in ("equalize", "clahe"):
        out = standardise_intensity(dark, mode)
        assert out.dtype == np.uint8 and out.shape == g.shape and out.std() > dark.std()
    with pytest.raises(ValueError, match="intensity"):
        standardise_intensity(g, "gamma")
    spec = {"crop": "none", "pad_square": True, "intensity": "clahe", "text_removal": "none"}
    assert apply_preprocess(rect, spec).shape == (100, 100)


def test_bad_options_fail_with_the_valid_names() -> None:
    from cxrlab.config import ConfigError

    with pytest.raises(ConfigError, match="intensity"):
        load_config(None, ["preprocess.intensity=gamma"])
    with pytest.raises(ConfigError, match="loss"):
        load_config(None, ["loss=focal"])


def _split_with_sources(tmp: Path) -> Path:
    """Phantoms from two sites, unbalanced: site s1 has 30 images per class, s2 only 6 NORMAL and 6 PNEUMONIA."""
    from cxrlab.data.ingest import IngestConfig, ingest
    from cxrlab.data.split import SplitConfig, split
    from cxrlab.data.synth import SynthConfig, generate

    generate(SynthConfig(out=tmp / "s1", n_per_class=30, size=64, seed=TEST_SEED))
    generate(SynthConfig(out=tmp / "s2", n_per_class=6, size=64, seed=TEST_SEED + 7))
    for p in (tmp / "s2" / "COVID19").iterdir():
        p.unlink()
    (tmp / "s2" / "COVID19").rmdir()
    ingest(IngestConfig(src=tmp / "s1", extra_src=(tmp / "s2",), out=tmp / "m", workers=0, progress=False))
    split(SplitConfig(manifest=tmp / "m", out=tmp / "split", fractions=(0.6, 0.2, 0.2), progress=False))
    return tmp / "split"


def test_source_balanced_sampler_draws_every_cell_equally(tmp_path: Path) -> None:
    from cxrlab.data.datamodule import make_datamodule

    split_dir = _split_with_sources(tmp_path)
    cfg = Config(model_name=TEST_MODEL, img_size=(32, 32), data=str(split_dir), imbalance="source", cache_images=False)
    dm = make_datamodule(cfg)
    ds = dm.dataset("train")
    sampler = dm.train_sampler()
    drawn = [i for e in range(30) for _, i in (sampler.set_epoch(e) or iter(sampler))]
    cells = np.array([f"{ds.sources[i]}/{ds.labels[i]}" for i in drawn])
    shares = np.unique(cells, return_counts=True)[1] / len(cells)
    assert len(shares) == 5 and np.allclose(shares, 1 / 5, atol=0.03)  # s1 x 3 classes + s2 x 2 classes
    assert dm.group_names() == ["s1/COVID19", "s1/NORMAL", "s1/PNEUMONIA", "s2/NORMAL", "s2/PNEUMONIA"]


@pytest.mark.trains
def test_groupdro_and_preprocessing_train_and_travel_in_the_bundle(tmp_path: Path) -> None:
    from cxrlab.analysis.evaluate import EvalConfig, evaluate
    from cxrlab.inference.bundle import load_bundle
    from cxrlab.training.train import train

    split_dir = _split_with_sources(tmp_path)
    sets = [f"model_name={TEST_MODEL}", "pre_trained=false", "img_size=[48,48]", "batch_size=16", "epochs=2",
            "threads=1", f"data={split_dir}", f"output_dir={tmp_path / 'runs'}", "tracking.wandb=off",
            "trainer.enable_progress_bar=false", "run_name=dro", "loss=groupdro", "groupdro_eta=0.5", "evaluate=test",
            "imbalance=source", "preprocess.pad_square=true", "preprocess.intensity=clahe"]  # fmt: skip
    r = train(load_config(None, sets))
    q = torch.load(r.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]["group_q"]
    assert q.shape == (5,) and q.sum().item() == pytest.approx(1.0) and q.std() > 0  # groups weighted apart
    b = load_bundle(r.run_dir)
    assert b.meta.preprocess["pad_square"] is True and b.meta.preprocess["intensity"] == "clahe"
    # inference applies the same steps: the bundle reproduces the run's own test predictions from the files
    e = evaluate(EvalConfig(target=r.run_dir, n_boot=0, progress=False, report=False, wandb="off"))
    assert e.metrics["test/accuracy"] == pytest.approx(r.metrics["test/accuracy"], abs=1e-6)


def test_multisource_config_is_cpu_plus_the_mitigations() -> None:
    from conftest import REPO

    base = load_config(REPO / "configs" / "cpu.yaml").model_dump()
    multi = load_config(REPO / "configs" / "cpu-multisource.yaml").model_dump()
    diff = {k for k in base if base[k] != multi[k]}
    assert diff == {"imbalance", "loss", "preprocess"}
    assert multi["imbalance"] == "source" and multi["loss"] == "groupdro"
    assert multi["preprocess"] | {"pad_square": False, "intensity": "none"} == base["preprocess"]
