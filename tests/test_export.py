"""Export contracts: ONNX / TorchScript reproduce PyTorch within 1e-4 on real X-rays (through the bundle's own
preprocessing, dynamic batch), carry their metadata, are re-made when stale; checkpoints load without pickle."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlab.data.io import read_xray
from cxrlab.inference.bundle import BundleError, UntrustedCheckpointError, load_bundle, load_checkpoint_state
from cxrlab.inference.export import (
    DIGEST_KEY,
    META_KEY,
    ExportError,
    default_path,
    ensure_onnx,
    export,
    onnx_is_current,
    read_onnx_metadata,
    run_exported,
    weights_digest,
)


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy: exports write next to the weights and some tests change them."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def real_grays(cxr_tiny: Path) -> list[np.ndarray]:
    """Two real X-rays per class (different sizes and aspect ratios)."""
    paths = [p for c in ("COVID19", "NORMAL", "PNEUMONIA") for p in sorted((cxr_tiny / c).glob("*.jpg"))[:2]]
    return [read_xray(p) for p in paths]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_on_real_images(bundle_copy: Path, real_grays, fmt: str) -> None:
    b = load_bundle(bundle_copy)
    path = export(b, fmt)
    assert path.parent == bundle_copy and path.is_file()
    x = torch.stack([b.preprocess(g) for g in real_grays])
    with torch.no_grad():
        ref = b.model(x).numpy()
    for batch in (x, x[:1]):  # the batch axis is dynamic: 6 and 1 from one export
        got = run_exported(path, fmt, batch)
        assert got.shape == (len(batch), 3)
        np.testing.assert_allclose(got, ref[: len(batch)], atol=1e-4, rtol=0)
    # the softmax probabilities users see agree as well
    np.testing.assert_allclose(
        torch.softmax(torch.from_numpy(run_exported(path, fmt, x)), 1).numpy(), b.predict_proba(real_grays), atol=1e-4
    )


def test_onnx_metadata_and_staleness(bundle_copy: Path) -> None:
    b = load_bundle(bundle_copy)
    path = ensure_onnx(b)
    meta = read_onnx_metadata(path)
    assert json.loads(meta[META_KEY])["class_names"] == ["COVID19", "NORMAL", "PNEUMONIA"]
    assert meta[DIGEST_KEY] == weights_digest(b)
    mtime = path.stat().st_mtime_ns
    assert ensure_onnx(b) == path and path.stat().st_mtime_ns == mtime  # reused while current

    # new weights in the bundle -> the cached export is stale and is re-made
    from cxrlab.inference.bundle import save_bundle

    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(0.01)
    save_bundle(b.model, b.meta, bundle_copy)
    b2 = load_bundle(bundle_copy)
    assert not onnx_is_current(path, b2)
    assert ensure_onnx(b2) == path and onnx_is_current(path, b2)


def test_failed_check_leaves_no_file(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cxrlab.inference.export as ex

    real = ex.run_exported
    monkeypatch.setattr(ex, "run_exported", lambda p, f, x: real(p, f, x) + 1e-3)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export(bundle_copy, "onnx", bundle_copy / "out.onnx")
    assert sorted(p.name for p in bundle_copy.iterdir()) == ["bundle.json", "model.safetensors"]


def test_unknown_format(bundle_copy: Path) -> None:
    with pytest.raises(ExportError, match="torchscript"):
        export(bundle_copy, "tflite")  # type: ignore[arg-type]


def test_export_cli(bundle_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cxrlab import RESEARCH_NOTICE
    from cxrlab.cli import main

    out = tmp_path / "exports"
    out.mkdir()
    assert main(["export", str(bundle_copy), "--format", "onnx", "--out", str(out)]) == 0
    assert (out / "model.onnx").is_file()
    text = capsys.readouterr().out
    assert "max |diff|" in text and RESEARCH_NOTICE in " ".join(text.split())


# ---------------------------------------------------------------------------------------- checkpoints / pickle


def test_checkpoint_loads_weights_only(bundle_copy: Path, tmp_path: Path) -> None:
    """A Lightning-style checkpoint of a run: tensors only -> loads, with the run's bundle metadata."""
    b = load_bundle(bundle_copy)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(bundle_copy, run / "bundle")
    state = {f"model.{k}": v + 1e-3 if v.is_floating_point() else v for k, v in b.model.state_dict().items()}
    ckpt = run / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 12}, ckpt)
    loaded = load_bundle(ckpt)
    assert loaded.meta.class_names == b.meta.class_names and loaded.weights_path == ckpt
    k = next(iter(b.model.state_dict()))
    assert torch.equal(loaded.model.state_dict()[k], state[f"model.{k}"])
    # its ONNX cache lives beside the checkpoint, not over the bundle's own export
    assert default_path(loaded, "onnx") == run / "checkpoints" / "best.onnx"


class _Payload:
    """Unpickling this runs code: exactly what weights_only=True must refuse."""

    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch names the protocol, then refuses
def test_untrusted_pickle_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "evil.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {"w": _Payload()}}, f)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": _Payload()}, tmp_path / "evil2.pt")
    for p in (bad, tmp_path / "evil2.pt"):
        with pytest.raises(UntrustedCheckpointError, match="refusing to load"):
            load_checkpoint_state(p)
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(BundleError, match="no bundle.json"):
        load_bundle(tmp_path / "evil2.pt")
