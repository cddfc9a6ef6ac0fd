"""Contracts of the shared inference core (cxrlab.inference.infer, read_checkpoint, runs.read_metrics, the transform
list's cached head): one read loop, one forward pass, one checkpoint reader, one metrics.csv reader, one resize; and
the "one place" rules read from the source."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlab.data.io import read_xray
from cxrlab.inference.bundle import CheckpointError, load_bundle, read_checkpoint
from cxrlab.inference.infer import forward_pass, read_batches

SRC = Path(__file__).resolve().parents[1] / "src" / "cxrlab"
CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]


@pytest.fixture(scope="module")
def files(cxr_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """5 real images, a PNG cut short after its header (position 2) and a missing file (position 4)."""
    real = [p for c in CLASSES for p in sorted((cxr_tiny / c).glob("*.jpg"))[:2]][:5]
    d = tmp_path_factory.mktemp("files")
    buf = io.BytesIO()
    Image.fromarray(read_xray(real[0])).save(buf, "PNG")
    broken = d / "broken.png"
    broken.write_bytes(buf.getvalue()[:300])
    return [real[0], real[1], broken, real[2], d / "missing.png", real[3], real[4]]


def _run(paths, **kw):
    skipped: list[dict[str, str]] = []
    batches = list(read_batches(paths, 3, skipped, progress=False, **kw))
    return batches, skipped


@pytest.mark.parametrize("workers", [0, 2])
def test_read_batches_keeps_order_reports_failures_and_prepares(tiny_bundle: Path, files, workers: int) -> None:
    bundle = load_bundle(tiny_bundle)
    batches, skipped = _run(files, workers=workers, prepare=bundle.preprocess)
    assert [len(b.indices) + len(b.failed) for b in batches] == [3, 3, 1]  # every path in its batch, in order
    assert [i for b in batches for i in b.indices] == [0, 1, 3, 5, 6]
    failed = dict(f for b in batches for f in b.failed)
    assert set(failed) == {2, 4} and failed[4] == "file not found" and "PNG" in failed[2]
    assert [s["path"] for s in skipped] == [str(files[2]), str(files[4])]
    for b in batches:
        for i, g, x in zip(b.indices, b.grays, b.inputs, strict=True):
            assert np.array_equal(g, read_xray(files[i]))
            assert torch.equal(x, bundle.preprocess(g))  # prepared in the reader threads, exactly the bundle's way


def test_read_batches_does_not_open_known_problems_and_survives_a_failing_prepare(files) -> None:
    problems = [None] * len(files)
    problems[0] = "dangling symlink"

    def prepare(gray: np.ndarray) -> np.ndarray:
        if gray.shape == read_xray(files[1]).shape and np.array_equal(gray, read_xray(files[1])):
            raise RuntimeError("a decoder bug")
        return gray

    batches, _ = _run(files, workers=2, problems=problems, prepare=prepare)
    failed = dict(f for b in batches for f in b.failed)
    assert failed[0] == "dangling symlink"
    assert failed[1] == "RuntimeError: a decoder bug"  # one bad file, the run goes on
    assert [i for b in batches for i in b.indices] == [3, 5, 6]


def test_forward_features_and_channels_last_give_the_same_probabilities(tiny_bundle: Path, files) -> None:
    bundle = load_bundle(tiny_bundle)
    x = torch.stack([bundle.preprocess(read_xray(p)) for p in (files[0], files[1], files[3])])
    p, f = forward_pass(bundle.model, x)
    assert f is None and p.dtype == np.float64 and np.allclose(p.sum(1), 1)
    p2, feats = forward_pass(bundle.model, x, features=True)
    assert feats is not None and feats.shape[0] == 3 and feats.ndim == 2
    np.testing.assert_allclose(p2, p, atol=1e-12)
    with torch.no_grad():
        ref = torch.softmax(bundle.model(x).double(), 1).numpy()
    np.testing.assert_allclose(p, ref, atol=1e-6)
    np.testing.assert_allclose(forward_pass(bundle.model, x, channels_last=True)[0], p, atol=1e-5)


def test_predict_and_evaluate_go_through_the_one_loop(
    tiny_bundle: Path, files, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cxrlab.inference.infer as infer
    from cxrlab.analysis.evaluate import predict_items
    from cxrlab.inference.predict import Predictor

    calls: list[int] = []
    real = infer.read_batches

    def spy(paths, *a, **kw):
        calls.append(len(paths))
        yield from real(paths, *a, **kw)

    monkeypatch.setattr(infer, "read_batches", spy)
    import cxrlab.inference.predict as predict_mod

    monkeypatch.setattr(predict_mod, "read_batches", spy)
    preds = Predictor(tiny_bundle, device="cpu", batch_size=3, progress=False).predict(files)
    probs, kept, skipped = predict_items(load_bundle(tiny_bundle), [str(p) for p in files], 3, progress=False)
    assert calls == [len(files), len(files)]
    assert [p.ok for p in preds] == [True, True, False, True, False, True, True]
    assert kept == [0, 1, 3, 5, 6] and len(skipped) == 2
    got = np.array([[p.probabilities[c] for c in CLASSES] for p in preds if p.ok])
    np.testing.assert_allclose(got, probs, atol=1e-5)  # predict (channels_last) and evaluate agree


# ----------------------------------------------------------------------------------------- checkpoints


def _lightning_ckpt(path: Path, epoch: int) -> Path:
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "epoch": epoch, "global_step": 3}, path)
    return path


def test_read_checkpoint_errors_say_why(tmp_path: Path) -> None:
    good = _lightning_ckpt(tmp_path / "good.ckpt", 4)
    assert read_checkpoint(good, lightning=True)["epoch"] == 4
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint") as e:
        read_checkpoint(cut)
    assert not e.value.untrusted and e.value.reason and "\n" not in e.value.reason
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    assert set(read_checkpoint(plain)) == {"w"}
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        read_checkpoint(plain, lightning=True)
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "obj": Path("x")}, evil)  # a pickled class: weights_only refuses it
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(evil)
    assert e.value.untrusted
    with pytest.raises(CheckpointError, match="file not found"):
        read_checkpoint(tmp_path / "nope.ckpt")


def test_resume_falls_back_to_best_through_the_one_reader(tmp_path: Path) -> None:
    from cxrlab.errors import RunError
    from cxrlab.training.rundir import resume_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.ckpt"
    best = _lightning_ckpt(run / "checkpoints" / "best.ckpt", 2)
    _lightning_ckpt(last, 5)
    assert resume_checkpoint(run, last) == (last, None)
    last.write_bytes(last.read_bytes()[:300])
    ckpt, warning = resume_checkpoint(run, last)
    assert ckpt == best and "is damaged" in warning and "(epoch 2)" in warning
    with pytest.raises(RunError, match="Resume from the best checkpoint instead"):
        resume_checkpoint(run, last, explicit=True)
    best.write_bytes(b"")
    with pytest.raises(RunError, match="is damaged too"):
        resume_checkpoint(run, last)


# ----------------------------------------------------------------------------------------- metrics.csv


def test_read_metrics_merges_partial_rows_and_tolerates_absence(tmp_path: Path) -> None:
    from cxrlab.report.figures import training_curves_figure
    from cxrlab.runs import METRICS_FILE, read_metrics

    assert read_metrics(tmp_path) == []
    csv = tmp_path / METRICS_FILE
    # Lightning's own CSV logger: train and val of one epoch on separate rows, out of order
    csv.write_text("epoch,step,train/loss,val/f1_macro\n1,9,0.5,\n0,4,0.9,\n0,4,,0.4\n1,9,,0.6\n")
    rows = read_metrics(tmp_path)
    assert rows == [
        {"epoch": 0, "step": 4, "train/loss": 0.9, "val/f1_macro": 0.4},
        {"epoch": 1, "step": 9, "train/loss": 0.5, "val/f1_macro": 0.6},
    ]
    assert read_metrics(csv) == rows
    assert training_curves_figure(csv, best_epoch=1) is not None
    csv.write_text("")
    assert read_metrics(csv) == [] and training_curves_figure(csv) is None


# --------------------------------------------------------------------------------------------- resize


def test_the_cache_holds_the_resized_head_and_items_do_not_resize_again(
    phantom_split: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import albumentations as A

    from cxrlab.config import load_config
    from cxrlab.data.datamodule import CXRDataModule
    from cxrlab.data.manifest import load_split

    sets = ["model_name=test_efficientnet", "pre_trained=false", "img_size=[48,40]", f"data={phantom_split}"]
    sets += ["trainer.enable_progress_bar=false", "augment.hflip_p=0.5", "augment.scale=[0.8,1.2]", "augment.p=1.0"]
    cached = CXRDataModule(load_config(None, sets), load_split(phantom_split)).dataset("train")
    plain = CXRDataModule(load_config(None, [*sets, "cache_images=false"]), load_split(phantom_split)).dataset("train")
    assert tuple(cached.cache.data.shape[1:]) == (48, 40)
    assert not any(isinstance(t, A.Resize) for t in cached.per_item.transforms)
    ref = [plain[(1, i)][0] for i in range(6)]  # the whole list per item, resize included

    def no_resize(*a, **kw):
        raise AssertionError("a cached item was resized again")

    monkeypatch.setattr(A.Resize, "apply", no_resize)
    got = [cached[(1, i)][0] for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))  # same augmentation draws, same pixels
    assert got[0].shape == (3, 48, 40)


# ------------------------------------------------------------------------------------- one place each


def _trees() -> dict[str, ast.Module]:
    return {str(p.relative_to(SRC)): ast.parse(p.read_text()) for p in sorted(SRC.rglob("*.py"))}


def _calls(name: str) -> dict[str, int]:
    """module path -> number of calls of ``name`` (e.g. ``torch.load``) in its code."""
    out: dict[str, int] = {}
    for mod, tree in _trees().items():
        n = sum(1 for node in ast.walk(tree) if isinstance(node, ast.Call) and ast.unparse(node.func) == name)
        if n:
            out[mod] = n
    return out


def _docstrings(tree: ast.Module) -> set[int]:
    kinds = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, kinds) and node.body and isinstance(node.body[0], ast.Expr)
    }


def test_one_place_each() -> None:
    trees = _trees()
    assert _calls("torch.load") == {"inference/bundle.py": 1}  # read_checkpoint
    assert _calls("json.dump") == {}  # JSON files are written by atomic.write_json
    writes_json = [
        mod
        for mod, tree in trees.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and ast.unparse(node.func).endswith("write_text")
        and any(ast.unparse(a).startswith("json.dumps(") for a in node.args)
    ]
    assert writes_json == []
    module_defs = [
        (mod, node.name)
        for mod, tree in trees.items()
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name in ("resolve_device", "read_batches", "forward_pass")
    ]
    one = ("forward_pass", "read_batches", "resolve_device")
    assert sorted(module_defs) == [("inference/infer.py", n) for n in one]
    # the decoded-image batches of a model come from one loop: nothing else in inference/ or analysis/ starts threads
    pools = {m for m in _calls("ThreadPoolExecutor") if m.startswith(("inference/", "analysis/"))}
    assert pools == {"inference/infer.py"}


def test_run_dir_file_names_are_written_only_in_runs_py() -> None:
    """A run-directory file name as a string literal outside runs.py (docstrings aside) is a second copy of the
    contract. Allowed: the Hugging Face Hub's own ``model.safetensors`` (pretrained weights, not a run's file)."""
    runs = ast.parse((SRC / "runs.py").read_text())
    names = {
        n.value.value
        for n in runs.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
    }
    names = {v for v in names if "." in v or v == "checkpoints"}
    assert {"best.ckpt", "last.ckpt", "metrics.csv", "summary.json", "bundle.json", "checkpoints"} <= names
    found = []
    for mod, tree in _trees().items():
        if mod == "runs.py":
            continue
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                v = node.value
                if any(v == n or v.endswith("/" + n) or v.startswith(n + "/") for n in names):
                    found.append((mod, v))
    assert found == [("training/model.py", "model.safetensors")]
