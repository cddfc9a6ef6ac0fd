"""Contracts of cxrlab.analysis.shift and cxrlab.analysis.ood: the statistics against hand-computed and simulated
cases, and the warnings end to end on a model trained on phantoms (own test split: silent; one-class folder,
collapsing model, foreign inputs: loud)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console
from safetensors.torch import load_file

import cxrlab.cli.evaluate
import cxrlab.cli.serve
from conftest import TEST_SEED, tiny_train_sets
from cxrlab.analysis.ood import colour_share, input_problems, polarity
from cxrlab.analysis.shift import (
    SHIFT_WEIGHTS,
    bbse_weights,
    collapse_check,
    label_shift,
    stuart_maxwell,
)
from cxrlab.cli import main

CLASSES = ["A", "B", "C"]


@pytest.fixture(autouse=True)
def _wide_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps at 80 columns when captured; widen so messages stay on one line."""
    for mod in (cxrlab.cli.evaluate, cxrlab.cli.serve):
        monkeypatch.setattr(mod, "console", Console(width=400))
        monkeypatch.setattr(mod, "err_console", Console(stderr=True, width=400))


def _meta(cond: np.ndarray, prior: np.ndarray, n_val: int = 3000) -> dict:
    """Shift statistics of a model with P(pred | true) = ``cond`` validated on ``n_val`` images of ``prior``."""
    cm = np.round(cond * (prior * n_val)[:, None]).astype(int)
    return {"classes": CLASSES, "val_confusion": cm.tolist(), "train_prior": (prior * 1000).astype(int).tolist()}


COND = np.array([[0.85, 0.10, 0.05], [0.08, 0.80, 0.12], [0.05, 0.15, 0.80]])
PRIOR = np.array([1 / 3, 1 / 3, 1 / 3])


# --------------------------------------------------------------------------------------------- statistics


def test_stuart_maxwell_hand_computed() -> None:
    # 2 x 2: Stuart-Maxwell is McNemar without continuity correction, (b - c)^2 / (b + c)
    stat, p, df = stuart_maxwell(np.array([[30, 12], [4, 40]]))
    assert stat == pytest.approx((12 - 4) ** 2 / 16) and df == 1
    assert p == pytest.approx(0.0455, abs=1e-3)
    assert stuart_maxwell(np.diag([10, 20, 30])) == (0.0, 1.0, 0)  # perfect: margins equal
    assert stuart_maxwell(np.array([[5, 3, 0], [0, 5, 3], [3, 0, 5]]))[1] == 1.0  # errors that balance out


def test_collapse_names_the_class_and_ignores_a_merely_inaccurate_model() -> None:
    good = np.array([[48, 1, 1], [2, 46, 2], [0, 3, 47]])
    assert not collapse_check(good, CLASSES).collapsed
    collapsing = np.array([[50, 0, 0], [47, 3, 0], [45, 1, 4]])
    r = collapse_check(collapsing, CLASSES)
    assert r.collapsed and r.onto == "A" and r.p_value < 1e-6
    assert "collapse onto A" in r.message and "142 of 150" in r.message
    # inaccurate but spread: one third wrong in every direction on a one-class set -> not a collapse
    spread = np.array([[0, 0, 0], [10, 40, 10], [0, 0, 0]])
    assert not collapse_check(spread, CLASSES).collapsed


def test_bbse_recovers_the_class_mix() -> None:
    rng = np.random.default_rng(TEST_SEED)
    q = np.array([0.7, 0.2, 0.1])
    y = rng.choice(3, size=20000, p=q)
    pred = np.array([rng.choice(3, p=COND[t]) for t in y])
    r = label_shift(np.bincount(pred, minlength=3), _meta(COND, PRIOR))
    assert r.shifted and r.p_value < 1e-10
    assert np.allclose(list(r.estimated.values()), q, atol=0.03)
    assert np.allclose(bbse_weights(np.diag([5, 5]), [0.5, 0.5]), [1, 1])


def test_label_shift_is_silent_on_data_like_the_training_data() -> None:
    """The own-test-split case: 150 images drawn like the validation data. Over 400 simulated test sets the warning
    fires at most a handful of times (alpha 1e-3 plus the effect-size floor)."""
    rng = np.random.default_rng(TEST_SEED)
    meta = _meta(COND, PRIOR, n_val=150)
    fired = 0
    for _ in range(400):
        y = rng.choice(3, size=150, p=PRIOR)
        pred = np.array([rng.choice(3, p=COND[t]) for t in y])
        fired += label_shift(np.bincount(pred, minlength=3), meta).shifted
    assert fired <= 2


def test_label_shift_with_labels_tells_class_mix_from_broken_predictions() -> None:
    meta = _meta(COND, PRIOR)
    # only class B, predicted as the model would: a change of class mix, the estimate matches the truth
    mix = label_shift([80, 800, 120], meta, true_counts=[0, 1000, 0])
    assert mix.shifted and mix.estimate_gap < 0.15 and "class mix" in mix.message
    # balanced truth, everything predicted A: the estimate misses the truth by far
    broken = label_shift([990, 5, 5], meta, true_counts=[333, 333, 334])
    assert broken.shifted and broken.estimate_gap > 0.5 and "not trustworthy" in broken.message
    few = label_shift([20, 0, 0], meta)
    assert not few.shifted and "skipped" in few.message


# ------------------------------------------------------------------------------------------- input checks


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def test_input_checks(phantom_dir: Path) -> None:
    g = cv2.imread(str(next((phantom_dir / "NORMAL").iterdir())), cv2.IMREAD_GRAYSCALE)
    assert polarity(255 - g) == pytest.approx(-polarity(g), abs=1e-3)  # odd: inverting flips the sign
    assert input_problems(np.full((64, 64), 77, np.uint8), 0.0, 0.0) == ["constant image (no structure)"]
    assert colour_share(_png(g)) == 0.0
    rgb = np.dstack([g, np.roll(g, 9, axis=1), 255 - g])
    assert colour_share(_png(rgb)) > 0.5
    assert "colour image" in input_problems(g, colour_share(_png(rgb)), None)[0]


def test_polarity_separates_real_radiographs_from_their_inversions(cxr_tiny: Path) -> None:
    from cxrlab.data.io import read_xray

    paths = [p for c in ("COVID19", "NORMAL", "PNEUMONIA") for p in sorted((cxr_tiny / c).iterdir())[::10]]
    pol = np.array([polarity(read_xray(p)) for p in paths])
    assert (pol > 0).mean() >= 0.98  # upright
    inv = np.array([polarity(255 - read_xray(p)) for p in paths])
    assert (inv < 0).mean() >= 0.98


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model trained on 50 phantoms per class (30/10/10): its bundle holds the shift statistics."""
    from cxrlab.config import load_config
    from cxrlab.data.ingest import IngestConfig, ingest
    from cxrlab.data.split import SplitConfig, split
    from cxrlab.data.synth import SynthConfig, generate
    from cxrlab.training.train import train

    base = tmp_path_factory.mktemp("shift")
    generate(SynthConfig(out=base / "img", n_per_class=50, size=64, seed=TEST_SEED))
    ingest(IngestConfig(src=base / "img", out=base / "m", workers=0, progress=False))
    split(SplitConfig(manifest=base / "m", out=base / "s", fractions=(0.6, 0.2, 0.2), progress=False))
    sets = tiny_train_sets(base / "s", base / "runs", "batch_size=16", "epochs=10", "learning_rate=0.003", "run_name=r")
    res = train(load_config(None, sets))
    return {"run": res.run_dir, "img": base / "img", "base": base}


def _foreign(d: Path, phantom: Path) -> Path:
    """Inputs no chest X-ray model should trust: colour photos-like noise, grey noise, constant, inverted."""
    d.mkdir()
    rng = np.random.default_rng(TEST_SEED)
    cv2.imwrite(str(d / "noise_rgb.png"), rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    cv2.imwrite(str(d / "noise.png"), rng.integers(0, 256, (96, 96), dtype=np.uint8))
    for v in (0, 255):
        cv2.imwrite(str(d / f"constant_{v}.png"), np.full((64, 64), v, np.uint8))
    g = cv2.imread(str(phantom), cv2.IMREAD_GRAYSCALE)
    gradient = np.dstack([np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (96, 1))] * 3)
    gradient[..., 0] = 255 - gradient[..., 0]
    cv2.imwrite(str(d / "colour.png"), gradient)
    cv2.imwrite(str(d / "inverted.png"), 255 - g)
    return d


@pytest.mark.trains
def test_bundle_holds_the_statistics(trained: dict[str, Path]) -> None:
    b = trained["run"] / "bundle"
    meta = json.loads((b / "bundle.json").read_text())["shift"]
    assert meta["classes"] == ["COVID19", "NORMAL", "PNEUMONIA"]
    assert np.asarray(meta["val_confusion"]).sum() == meta["n_val"] == 30
    assert meta["train_prior"] == [30, 30, 30] and meta["ood"]["threshold"] > 0
    t = load_file(str(b / SHIFT_WEIGHTS))
    d = meta["ood"]["feature_dim"]
    assert t["mean"].shape == (d,) and t["precision"].shape == (d, d)


@pytest.mark.trains
def test_own_test_split_raises_no_warning(trained: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from cxrlab.analysis.evaluate import EvalConfig, evaluate

    e = evaluate(EvalConfig(target=trained["run"], split="val", n_boot=0, progress=False, report=False))
    assert e.warnings == []
    assert not e.shift["collapse"]["collapsed"] and not e.shift["label_shift"]["shifted"]
    pred = e.predictions
    assert {"ood", "ood_score", "ood_reasons"} <= set(pred.columns) and pred["ood"].mean() <= 0.2
    argv = ["evaluate", str(trained["run"]), "--n-boot", "0", "--no-progress", "--out", str(trained["base"] / "e")]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "shift checks passed" in out.out and "warning" not in out.err


@pytest.mark.trains
def test_one_class_folder_raises_the_label_shift_warning(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    one = trained["base"] / "one"
    (one / "NORMAL").mkdir(parents=True)
    for p in sorted((trained["img"] / "NORMAL").iterdir()):
        shutil.copy(p, one / "NORMAL" / p.name)
    argv = ["evaluate", str(trained["run"]), "--data", str(one), "--n-boot", "0", "--no-progress"]
    assert main([*argv, "--out", str(trained["base"] / "e1")]) == 0
    err = capsys.readouterr().err
    assert "label shift" in err and "NORMAL" in err
    # predict needs no labels: the same warning, and the JSON carries the estimate
    assert main(["predict", str(trained["run"]), str(one), "--format", "json", "--no-progress"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    est = doc["label_shift"]["estimated"]
    assert doc["label_shift"]["shifted"] and max(est, key=est.get) == "NORMAL"
    assert "label shift" in out.err


@pytest.mark.trains
def test_collapsing_model_raises_the_collapse_warning(trained: dict[str, Path]) -> None:
    """A bundle whose classifier bias drowns everything predicts one class: evaluate names it."""
    import torch

    from cxrlab.analysis.evaluate import EvalConfig, evaluate
    from cxrlab.inference.bundle import load_bundle, save_bundle

    stub = trained["base"] / "stub"
    shutil.copytree(trained["run"], stub)
    b = load_bundle(stub)
    with torch.no_grad():
        b.model.get_classifier().bias[:] = torch.tensor([0.0, 0.0, 100.0])
    save_bundle(b.model, b.meta, stub / "bundle")  # the shift statistics stay (bundle.json keeps them)
    e = evaluate(EvalConfig(target=stub, split="val", n_boot=0, progress=False, report=False))
    assert e.shift["collapse"]["collapsed"] and e.shift["collapse"]["onto"] == "PNEUMONIA"
    assert any("collapse onto PNEUMONIA" in w for w in e.warnings)
    assert any(w.startswith("label shift") for w in e.warnings)


@pytest.mark.trains
def test_foreign_inputs_are_flagged_in_predict_and_serve(trained: dict[str, Path], capsys) -> None:
    from fastapi.testclient import TestClient

    from cxrlab.serve.app import create_app

    d = _foreign(trained["base"] / "foreign", next((trained["img"] / "NORMAL").iterdir()))
    assert main(["predict", str(trained["run"]), str(d), "--format", "csv", "--no-progress"]) == 0
    out = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out.out)))
    flagged = {Path(r["path"]).name: r["ood_reasons"] for r in rows if r["ood"] == "true"}
    assert set(flagged) == {p.name for p in d.iterdir()}, flagged
    assert "constant" in flagged["constant_0.png"] and "colour" in flagged["colour.png"]
    assert "inverted" in flagged["inverted.png"]
    assert "out of distribution" in out.err

    with TestClient(create_app(trained["run"])) as client:
        r = client.post("/predict", files={"file": ("c.png", (d / "constant_255.png").read_bytes(), "image/png")})
        assert r.status_code == 200 and r.json()["ood"]["flag"] and r.json()["ood"]["reasons"]
        ok = next((trained["img"] / "COVID19").iterdir())
        body = client.post("/predict", files={"file": ("x.png", ok.read_bytes(), "image/png")}).json()
        assert set(body["ood"]) == {"flag", "score", "reasons"} and body["ood"]["score"] is not None
        assert 'id="ood"' in client.get("/").text  # the page's banner
        assert client.get("/health").json()["ood_check"] is True


@pytest.mark.trains
def test_fit_shift_adds_statistics_to_an_older_bundle(
    tiny_bundle: Path, phantom_split: Path, tmp_path: Path, capsys
) -> None:
    from cxrlab.analysis.evaluate import EvalConfig, evaluate

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    e = evaluate(EvalConfig(target=b, data=phantom_split, split="test", n_boot=0, progress=False, report=False))
    assert "ood" not in e.predictions.columns and "fit-shift" in e.shift["note"]
    assert main(["fit-shift", str(b), "--data", str(phantom_split)]) == 0
    assert "fit-shift" in capsys.readouterr().out and (b / SHIFT_WEIGHTS).is_file()
    e = evaluate(EvalConfig(target=b, data=phantom_split, split="test", n_boot=0, progress=False, report=False))
    assert "ood" in e.predictions.columns and "label_shift" in e.shift
