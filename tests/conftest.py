"""Shared fixtures: real data from ../shared/data (skipped when absent), synthetic phantoms, tiny models,
and an offline W&B sandbox so no test writes outside its temp directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXRLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
TEST_MODEL = "test_efficientnet"  # timm's tiny test model: fast on 2 cores
# The data seed of every test that generates data and trains on it. A training test must pass on any value:
# benchmarks/seed_robustness.py reruns them with CXRLAB_TEST_SEED=1..5 and prints a pass table.
TEST_SEED = int(os.environ.get("CXRLAB_TEST_SEED", "1"))


def tiny_train_sets(data: Path, out: Path, *extra: str) -> list[str]:
    """``load_config`` overrides for a training test: ``TEST_MODEL`` from scratch at 64 px, batch 8, one thread,
    no W&B, no progress bar, on the split ``data`` into ``out``; ``extra`` comes last, so it overrides these."""
    return [
        f"model_name={TEST_MODEL}",
        "pre_trained=false",
        "img_size=[64,64]",
        "batch_size=8",
        "threads=1",
        f"data={data}",
        f"output_dir={out}",
        "tracking.wandb=off",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _wandb_sandbox(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B offline with every directory it touches inside a temp dir."""
    d = tmp_path_factory.getbasetemp() / "wandb-home"
    d.mkdir(exist_ok=True)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(d))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cxr_tiny(shared_data: Path) -> Path:
    p = shared_data / "cxr-tiny"
    if not p.is_dir():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture(scope="session")
def cxr_full(shared_data: Path) -> Path:
    p = shared_data / "cxr-full"
    if not p.is_dir():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 24 phantoms of 96 px, one folder per class (no marker), drawn with ``TEST_SEED``."""
    from cxrlab.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("phantoms")
    generate(SynthConfig(out=out, n_per_class=24, size=96, seed=TEST_SEED))
    return out


@pytest.fixture(scope="session")
def phantom_split(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``phantom_dir`` through the real ingest + split (60/20/20): a split directory for training tests."""
    from cxrlab.data.ingest import IngestConfig, ingest
    from cxrlab.data.split import SplitConfig, split

    base = tmp_path_factory.mktemp("phantom-split")
    ingest(IngestConfig(src=phantom_dir, out=base / "manifest", workers=0, progress=False))
    split(SplitConfig(manifest=base / "manifest", out=base / "split", fractions=(0.6, 0.2, 0.2), progress=False))
    return base / "split"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained bundle of timm's tiny test model (3 classes, 64x64): for I/O contracts, not accuracy."""
    import timm
    import torch

    from cxrlab.inference.bundle import BundleMeta, save_bundle
    from cxrlab.transforms import norm_constants

    torch.manual_seed(0)
    model = timm.create_model(TEST_MODEL, pretrained=False, num_classes=3, in_chans=3)
    mean, std = norm_constants(3)
    meta = BundleMeta(
        model_name=TEST_MODEL,
        class_names=["COVID19", "NORMAL", "PNEUMONIA"],
        img_size=(64, 64),
        in_chans=3,
        mean=mean,
        std=std,
        dataset_version="test",
    )
    return save_bundle(model, meta, tmp_path_factory.mktemp("bundle"))


CHROMIUM = os.environ.get("CXRLAB_CHROMIUM", "/usr/bin/chromium")
# No background networking / component updates: the machine has no network and Chromium would retry forever.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright (skips cleanly when either is missing)."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"headless Chromium not found at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
