"""Predict contracts: real X-rays and a real DICOM through the bundle's own preprocessing, folders with a corrupt
file, batching, the ONNX backend, and the CLI's three output formats (each with the research notice)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlab import RESEARCH_NOTICE
from cxrlab.data.io import read_xray
from cxrlab.inference.bundle import load_bundle
from cxrlab.inference.predict import PredictError, Prediction, Predictor

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]


@pytest.fixture(scope="module")
def real_paths(cxr_tiny: Path) -> list[Path]:
    return [p for c in CLASSES for p in sorted((cxr_tiny / c).glob("*.jpg"))[:2]]


@pytest.fixture(scope="module")
def dicom_path() -> Path:
    data = pytest.importorskip("pydicom.data")
    return Path(data.get_testdata_file("RG1_UNCR.dcm"))


@pytest.fixture
def folder(real_paths: list[Path], tmp_path: Path) -> Path:
    """Real images in a nested folder, one truncated PNG, plus files that are not inputs (csv, hidden)."""
    d = tmp_path / "inbox"
    (d / "a" / "b").mkdir(parents=True)
    for i, p in enumerate(real_paths[:3]):
        shutil.copy(p, (d / "a" / "b" if i else d) / p.name)
    # a real PNG cut short after its header: sniffs as PNG, fails in decoding
    buf = io.BytesIO()
    Image.fromarray(read_xray(real_paths[0])).save(buf, "PNG")
    (d / "a" / "broken.png").write_bytes(buf.getvalue()[:300])
    (d / "SOURCES.csv").write_text("path,label\n")
    (d / ".hidden.jpg").write_bytes(b"not used")
    return d


def _check(pred: Prediction) -> None:
    assert pred.ok, pred.error
    assert pred.label in CLASSES and list(pred.probabilities) == CLASSES
    assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert pred.label == max(pred.probabilities, key=pred.probabilities.get)


def test_real_images_and_dicom_use_the_bundle_preprocessing(tiny_bundle: Path, real_paths, dicom_path) -> None:
    paths = [*real_paths, dicom_path]
    preds = Predictor(tiny_bundle, device="cpu", batch_size=4, progress=False).predict(paths)
    assert [p.path for p in preds] == [str(p) for p in paths]  # input order across batches of 4
    for pred in preds:
        _check(pred)
    # exactly the bundle's own preprocessing + model: same numbers as Bundle.predict_proba
    ref = load_bundle(tiny_bundle).predict_proba([read_xray(p) for p in paths])
    got = np.array([[p.probabilities[c] for c in CLASSES] for p in preds])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    # batching does not change results
    one = Predictor(tiny_bundle, device="cpu", batch_size=1, progress=False).predict(real_paths[:3])
    np.testing.assert_allclose([[p.probabilities[c] for c in CLASSES] for p in one], got[:3], atol=1e-6)


def test_folder_with_corrupt_file_reports_it_and_goes_on(tiny_bundle: Path, folder: Path) -> None:
    preds = Predictor(tiny_bundle, device="cpu", batch_size=2, progress=False).predict([folder])
    assert len(preds) == 4  # 3 images + the broken PNG; csv and hidden files are not inputs
    bad = [p for p in preds if not p.ok]
    assert len(bad) == 1 and bad[0].path.endswith("broken.png")
    assert bad[0].label is None and bad[0].probabilities == {} and "PNG" in bad[0].error
    for p in preds:
        if p.ok:
            _check(p)


def test_missing_file_and_empty_input(tiny_bundle: Path, tmp_path: Path) -> None:
    pred = Predictor(tiny_bundle, device="cpu", progress=False)
    (res,) = pred.predict([tmp_path / "nope.png"])
    assert not res.ok and "not found" in res.error
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="no input images"):
        pred.predict([tmp_path / "empty"])
    with pytest.raises(PredictError, match="backend"):
        Predictor(tiny_bundle, backend="tensorrt")  # type: ignore[arg-type]


def test_predict_arrays(tiny_bundle: Path, real_paths) -> None:
    grays = [read_xray(p) for p in real_paths[:2]]
    preds = Predictor(tiny_bundle, device="cpu", progress=False).predict_arrays(grays, names=["x", "y"])
    assert [p.path for p in preds] == ["x", "y"]
    for p in preds:
        _check(p)


def test_onnx_backend_equals_torch(tiny_bundle: Path, real_paths, dicom_path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    paths = [*real_paths, dicom_path]
    torch_preds = Predictor(bundle, backend="torch", device="cpu", progress=False).predict(paths)
    onnx = Predictor(bundle, backend="onnx", device="cpu", batch_size=3, progress=False)
    assert onnx.onnx_path == bundle / "model.onnx"  # exported on first use, cached in the bundle
    onnx_preds = onnx.predict(paths)
    for a, b in zip(torch_preds, onnx_preds, strict=True):
        _check(b)
        assert a.label == b.label
        np.testing.assert_allclose(list(b.probabilities.values()), list(a.probabilities.values()), atol=1e-4)


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_formats_carry_the_notice(tiny_bundle: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cxrlab.cli import main

    base = ["predict", str(tiny_bundle), str(folder), "--no-progress", "--device", "cpu"]
    assert main([*base, "--format", "csv"]) == 0  # one unreadable file is not a failure without --strict
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 4 and all(r["notice"] == RESEARCH_NOTICE for r in rows)
    assert [r for r in rows if r["error"]][0]["path"].endswith("broken.png")
    good = [r for r in rows if not r["error"]]
    assert all(abs(sum(float(r[f"prob_{c}"]) for c in CLASSES) - 1) < 1e-5 for r in good)

    assert main([*base, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["notice"] == RESEARCH_NOTICE and doc["summary"] == {"images": 4, "errors": 1}
    assert doc["model"]["classes"] == CLASSES

    assert main([*base, "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert RESEARCH_NOTICE in " ".join(out.split()) and "broken.png" in out

    assert main([*base, "--format", "csv", "--strict"]) == 1
    capsys.readouterr()


def test_cam_overlays_written(tiny_bundle: Path, real_paths, tmp_path: Path) -> None:
    preds = Predictor(tiny_bundle, device="cpu", progress=False).predict(real_paths[:2], cam_dir=tmp_path / "cam")
    for p in preds:
        _check(p)
        cam = np.asarray(Image.open(p.cam_path))
        src = read_xray(p.path)
        assert cam.ndim == 3 and cam.shape[2] == 3 and cam.dtype == np.uint8
        # drawn over the original geometry (aspect kept, longer side <= 512) and actually coloured
        assert max(cam.shape[:2]) == min(512, max(src.shape))
        assert abs(cam.shape[0] / cam.shape[1] - src.shape[0] / src.shape[1]) < 0.02
        assert np.abs(cam[..., 0].astype(int) - cam[..., 2]).max() > 30
