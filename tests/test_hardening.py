"""Hardening contracts (issue #12): every failure gets one clear message, no file goes missing, no NaN becomes a
diagnosis. Each test here failed on the code before the change it checks.

Damaged and mismatched bundles, the CLI's one-line unexpected errors (traceback only with --debug), non-finite
model output in predict and serve, non-UTF-8 file names, atomic outputs, the one file walker shared by ingest and
predict, and the smaller items (decompression bomb -> 413, token file, run/sweep --set)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TEST_MODEL
from cxrlab.cli import main
from cxrlab.inference.bundle import META_FILE, WEIGHTS_FILE, BundleError, BundleMeta, load_bundle, save_bundle

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _gray(seed: int = 0, size: int = 72) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle (tests damage it)."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("img") / "x.png"
    p.write_bytes(_png(_gray()))
    return p


def _edit_meta(bundle: Path, **changes) -> None:
    d = json.loads((bundle / META_FILE).read_text())
    d.update(changes)
    (bundle / META_FILE).write_text(json.dumps(d))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh interpreter (what a user runs)."""
    code = "import sys; from cxrlab.cli import main; sys.exit(main())"
    full_env = {k: v for k, v in os.environ.items() if k != "CXRLAB_DEBUG"}
    full_env.update({"NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=300
    )


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# ------------------------------------------------------------------------------------- 1/3: bundles, CLI


def test_flipped_byte_in_weights_header_is_one_line_error(bundle: Path, image: Path) -> None:
    data = bytearray((bundle / WEIGHTS_FILE).read_bytes())
    data[20] ^= 0xFF  # inside the JSON header of the safetensors file
    (bundle / WEIGHTS_FILE).write_bytes(bytes(data))
    r = _cli("predict", str(bundle), str(image))
    assert r.returncode != 0
    line = _one_error_line(r.stderr)
    assert WEIGHTS_FILE in line and "sha256" in line and "copy the bundle again" in line

    # a bundle from before the checksum existed: the damaged header itself is named
    _edit_meta(bundle, weights_sha256="")
    r = _cli("predict", str(bundle), str(image))
    assert r.returncode != 0
    line = _one_error_line(r.stderr)
    assert "not a readable safetensors file" in line and str(bundle / WEIGHTS_FILE) in line


def test_bundle_records_weights_sha256_and_refuses_changed_weights(bundle: Path) -> None:
    meta = json.loads((bundle / META_FILE).read_text())
    assert len(meta["weights_sha256"]) == 64
    data = bytearray((bundle / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x01  # one flipped bit in a weight: still a valid file, different numbers
    (bundle / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its bundle.json: sha256"):
        load_bundle(bundle)


def test_truncated_weights(bundle: Path) -> None:
    w = bundle / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(BundleError, match="does not match its bundle.json"):
        load_bundle(bundle)
    _edit_meta(bundle, weights_sha256="")
    with pytest.raises(BundleError, match="truncated or damaged"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_name": "resnet18"}, r"do not match model_name='resnet18'"),
        ({"model_name": "notamodel"}, r"names model_name 'notamodel', which this timm .* does not know"),
        ({"class_names": ["A", "B", "C", "D"]}, r"the weights have 3 outputs but bundle.json lists 4 class_names"),
        ({"in_chans": 1, "mean": [0.5], "std": [0.25]}, r"the weights take 3 input channels but .* in_chans=1"),
        ({"class_names": ["A", "A", "B"]}, r"repeat \['A'\]"),
        ({"std": [0, 0, 0]}, r"std \[0.0, 0.0, 0.0\] has a value <= 0"),
        ({"mean": [float("nan")] * 3}, r"must be 3 finite numbers"),
        ({"class_names": "COVID19"}, r"class_names must be a list"),
    ],
)
def test_mismatched_bundle_json_gets_a_specific_error(bundle: Path, changes: dict, message: str) -> None:
    _edit_meta(bundle, **changes)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_bundle_json_not_json_and_symlink_to_a_non_bundle(bundle: Path, tmp_path: Path, image: Path) -> None:
    (bundle / META_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="is not valid JSON"):
        load_bundle(bundle)
    other = tmp_path / "photos"
    other.mkdir()
    shutil.copy(image, other / "x.png")
    link = tmp_path / "model"
    link.symlink_to(other, target_is_directory=True)
    with pytest.raises(BundleError, match="holds no model bundle"):
        load_bundle(link)
    file_link = tmp_path / "model-file"
    file_link.symlink_to(image)
    r = _cli("predict", str(file_link), str(image))
    assert r.returncode == 2 and "holds no model bundle" in _one_error_line(r.stderr)


def test_save_refuses_duplicate_class_names(tmp_path: Path) -> None:
    import timm

    model = timm.create_model(TEST_MODEL, pretrained=False, num_classes=2)
    meta = BundleMeta(TEST_MODEL, ["A", "A"], (32, 32), 3, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(BundleError, match="repeat"):
        save_bundle(model, meta, tmp_path / "b")
    assert not (tmp_path / "b" / META_FILE).exists()


def test_unexpected_error_is_one_line_and_traceback_only_with_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_bundle: Path, image: Path
) -> None:
    import cxrlab.inference.predict

    def boom(*_a, **_k):
        raise RuntimeError("decoder exploded\nsecond line")

    monkeypatch.setattr(cxrlab.inference.predict.Predictor, "predict", boom)
    monkeypatch.delenv("CXRLAB_DEBUG", raising=False)
    args = ["predict", str(tiny_bundle), str(image), "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert "unexpected RuntimeError: decoder exploded second line" in line
    assert "--debug" in line and "CXRLAB_DEBUG=1" in line and "test_hardening.py" not in line

    assert main(["--debug", *args]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "decoder exploded" in err

    monkeypatch.setenv("CXRLAB_DEBUG", "1")
    assert main(args) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_known_error_has_no_traceback_in_a_real_process(tmp_path: Path) -> None:
    """Through the console script: the old handler's AttributeError traceback (typer._click) is gone."""
    r = _cli("predict", str(tmp_path / "nope"), str(tmp_path / "x.png"))
    assert r.returncode == 2
    assert "bundle not found" in _one_error_line(r.stderr)


# ----------------------------------------------------------------------------------- 3: non-finite output


@pytest.fixture(scope="module")
def nan_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle whose (checksummed, loadable) weights hold NaN: what 'overwritten weights' look like once saved."""
    import timm

    from cxrlab.transforms import norm_constants

    model = timm.create_model(TEST_MODEL, pretrained=False, num_classes=3, in_chans=3)
    with torch.no_grad():
        model.get_classifier().weight.fill_(float("nan"))
    mean, std = norm_constants(3)
    meta = BundleMeta(TEST_MODEL, CLASSES, (64, 64), 3, mean, std, dataset_version="test")
    return save_bundle(model, meta, tmp_path_factory.mktemp("nan-bundle"))


def test_non_finite_logits_are_an_error_per_image_not_a_label(nan_bundle: Path, image: Path, tmp_path: Path) -> None:
    from cxrlab.inference.predict import Predictor

    p = Predictor(nan_bundle, device="cpu", progress=False)
    preds = p.predict([image, image])
    assert all(not x.ok and x.label is None and x.probabilities == {} for x in preds)
    assert "non-finite" in preds[0].error
    arr = p.predict_arrays([_gray(1)])[0]
    assert arr.label is None and "non-finite" in arr.error
    out = tmp_path / "p.csv"
    r = _cli("predict", str(nan_bundle), str(image), "--format", "csv", "-o", str(out), "--device", "cpu")
    assert r.returncode == 1, r.stderr  # every input failed
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["label"] == "" and "non-finite" in rows[0]["error"]


def test_serve_refuses_to_start_when_the_self_check_is_not_finite(nan_bundle: Path, tiny_bundle: Path) -> None:
    from cxrlab.serve.app import ServeError, ServeSettings, create_app, self_check

    with pytest.raises(ServeError, match="non-finite output .* on the built-in probe images"):
        create_app(nan_bundle, ServeSettings(device="cpu"))
    r = _cli("serve", str(nan_bundle), "--device", "cpu", "--port", "0")
    assert r.returncode == 2 and "refusing to serve" in _one_error_line(r.stderr)
    from cxrlab.inference.predict import Predictor

    self_check(Predictor(tiny_bundle, device="cpu", progress=False))  # a sound model passes


# ----------------------------------------------------------------------------- 2: names, atomic outputs

BAD_NAME = os.fsdecode(b"bad\xff\xfe.png")


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """Two classes; one image with a non-UTF-8 name, images in a symlinked sub-folder, a dangling link, a file
    symlink loop, a folder symlink back to its parent, and hidden/non-image files."""
    src = tmp_path / "src"
    for c in ("A", "B"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            (src / c / f"{c}{i}.png").write_bytes(_png(_gray(i + (10 if c == "B" else 0))))
    (src / "A" / BAD_NAME).write_bytes(_png(_gray(99)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "linked.png").write_bytes(_png(_gray(50)))
    (src / "B" / "more").symlink_to(elsewhere, target_is_directory=True)
    (src / "B" / "gone.png").symlink_to(tmp_path / "does-not-exist.png")
    (src / "B" / "loop.png").symlink_to(src / "B" / "loop.png")
    (src / "A" / "up").symlink_to(src / "A", target_is_directory=True)
    (src / "A" / "notes.txt").write_text("not an image")
    (src / "A" / ".hidden.png").write_bytes(b"x")
    return src


def test_ingest_survives_non_utf8_names_and_writes_atomically(odd_folder: Path, tmp_path: Path) -> None:
    from cxrlab.data.ingest import IngestConfig, ingest

    out = tmp_path / "out"
    res = ingest(IngestConfig(src=odd_folder, out=out, workers=0, progress=False))
    manifest = (out / "manifest.csv").read_bytes().decode("utf-8")  # valid UTF-8
    rejects = {r["path"]: r for r in csv.DictReader(io.StringIO((out / "rejects.csv").read_text("utf-8")))}
    bad = [r for r in rejects.values() if r["kind"] == "bad_name"]
    assert len(bad) == 1 and bad[0]["path"].endswith("bad\\xff\\xfe.png") and "not valid UTF-8" in bad[0]["reason"]
    assert "bad" not in manifest
    assert res.n_images == 7  # 3 + 3 + the image in the symlinked folder
    assert sorted(p.name for p in out.iterdir()) == ["ingest.json", "manifest.csv", "rejects.csv"]  # no *.tmp


def test_atomic_open_leaves_the_old_file_and_no_temp_on_error(tmp_path: Path) -> None:
    from cxrlab.atomic import atomic_open, write_text_atomic

    target = write_text_atomic(tmp_path / "out.csv", "old\n")
    with pytest.raises(UnicodeEncodeError), atomic_open(target, "w") as f:
        f.write("new\n")
        f.write(BAD_NAME)
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["out.csv"]


def test_predict_output_is_written_atomically(
    monkeypatch: pytest.MonkeyPatch, tiny_bundle: Path, image: Path, tmp_path: Path
) -> None:
    import cxrlab.cli.serve as cli_serve

    out = tmp_path / "pred.csv"

    def broken(*_a, **_k):
        raise RuntimeError("formatter died")

    monkeypatch.setattr(cli_serve, "format_csv", broken)
    assert main(["predict", str(tiny_bundle), str(image), "-f", "csv", "-o", str(out), "--device", "cpu"]) == 1
    assert os.listdir(tmp_path) == []  # no 0-byte pred.csv (the old code opened it before writing)


def test_predict_reports_non_utf8_names_printably(odd_folder: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.json"
    args = ["predict", str(tiny_bundle), str(odd_folder / "A"), "-f", "json", "-o", str(out), "--device", "cpu"]
    assert main(args) == 0
    doc = json.loads(out.read_text("utf-8"))
    bad = [p for p in doc["predictions"] if "bad" in p["path"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("bad\\xff\\xfe.png") and bad[0]["label"] in CLASSES


# ------------------------------------------------------------------------------------------- 4: walker


def test_ingest_and_predict_see_the_same_files_with_the_same_verdicts(
    odd_folder: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    from cxrlab.data.ingest import IngestConfig, ingest
    from cxrlab.inference.predict import Predictor

    out = tmp_path / "out"
    ingest(IngestConfig(src=odd_folder, out=out, workers=0, progress=False))
    manifest = {r["path"] for r in csv.DictReader((out / "manifest.csv").open())}
    rejects = {r["path"]: r for r in csv.DictReader((out / "rejects.csv").open())}
    ignored = {r["path"]: r["reason"] for r in json.loads((out / "ingest.json").read_text())["ignored"]}

    p = Predictor(tiny_bundle, device="cpu", progress=False)
    preds = p.predict([odd_folder])
    ok = {x.path for x in preds if x.ok}
    errors = {x.path: x.error for x in preds if not x.ok}
    p_ignored = dict(p.ignored)

    linked = str(odd_folder / "B" / "more" / "linked.png")
    assert linked in manifest and linked in ok  # images in a symlinked folder are found by both
    for name, kind in (("gone.png", "dangling_link"), ("loop.png", "symlink_loop")):
        path = str(odd_folder / "B" / name)
        assert rejects[path]["kind"] == kind and errors[path] == rejects[path]["reason"]
    up = str(odd_folder / "A" / "up")
    assert "already searched" in ignored[up] and p_ignored[up] == ignored[up]  # a loop, listed with its reason
    assert ignored == p_ignored  # notes.txt, .hidden.png, the loop folder
    # the same verdict for every file; the one difference is the name ingest cannot put in its UTF-8 manifest
    bad_name = {r for r, v in rejects.items() if v["kind"] == "bad_name"}
    assert manifest == ok - bad_name and set(rejects) - bad_name == set(errors)


def test_walker_follows_symlinked_folders_once(tmp_path: Path) -> None:
    from cxrlab.data.walk import walk

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"x")
    (tmp_path / "a" / "b" / "back").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "a" / "twin").symlink_to(tmp_path / "a" / "b", target_is_directory=True)
    found = [(f.path.relative_to(tmp_path).as_posix(), f.verdict) for f in walk(tmp_path / "a")]
    assert found == [("a/b/back", "ignored"), ("a/b/x.png", "file"), ("a/twin", "ignored")]


# ------------------------------------------------------------------------------------------- 7: smaller


def _bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (valid CRCs): a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_serve_decompression_bomb_is_413(tiny_bundle: Path) -> None:
    from fastapi.testclient import TestClient

    from cxrlab.serve.app import ServeSettings, create_app

    with TestClient(create_app(tiny_bundle, ServeSettings(device="cpu"))) as c:
        r = c.post("/predict", files={"file": ("bomb.png", _bomb_png(), "image/png")})
        assert r.status_code == 413, r.text
        assert "decompression bomb" in r.json()["detail"]


def test_serve_token_from_file_or_env_and_help_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_bundle: Path, tmp_path: Path
) -> None:
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(token=app.state.settings.token))
    monkeypatch.delenv("CXRLAB_TOKEN", raising=False)
    tf = tmp_path / "token"
    tf.write_text("from-the-file\n")
    assert main(["serve", str(tiny_bundle), "--token-file", str(tf), "--device", "cpu"]) == 0
    assert seen["token"] == "from-the-file"
    monkeypatch.setenv("CXRLAB_TOKEN", "from-env")
    assert main(["serve", str(tiny_bundle), "--device", "cpu"]) == 0
    assert seen["token"] == "from-env" and "visible" not in capsys.readouterr().err
    monkeypatch.delenv("CXRLAB_TOKEN")
    assert main(["serve", str(tiny_bundle), "--token", "on-the-line", "--device", "cpu"]) == 0
    assert "visible to other users" in capsys.readouterr().err
    (tmp_path / "empty").write_text("")
    assert main(["serve", str(tiny_bundle), "--token-file", str(tmp_path / "empty")]) == 2
    r = _cli("serve", "--help", env={"COLUMNS": "200"})
    assert "--token-file" in r.stdout and "CXRLAB_TOKEN" in r.stdout and "ps" in r.stdout


def test_run_takes_several_overrides_after_one_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import cxrlab.pipeline
    from cxrlab.errors import CxrlabError

    seen = {}

    def fake(cfg, log=None):
        seen["cfg"] = cfg
        raise CxrlabError("stop here")

    monkeypatch.setattr(cxrlab.pipeline, "run_pipeline", fake)
    assert main(["run", "--demo", "--out", str(tmp_path), "--set", "epochs=1", "seed=3"]) == 2
    assert seen["cfg"].src is None and seen["cfg"].overrides == ["epochs=1", "seed=3"]
    src = tmp_path / "data"
    src.mkdir()
    assert main(["run", str(src), "--out", str(tmp_path), "--set", "epochs=1", "seed=3"]) == 2
    assert seen["cfg"].src == src and seen["cfg"].overrides == ["epochs=1", "seed=3"]
    assert main(["run", str(src), "other", "--out", str(tmp_path)]) == 2  # two SRCs: a clear error


def _sweep_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(
        "method: grid\nmetric: {name: val/f1_macro, goal: maximize}\n"
        "parameters:\n  optimizer: {values: [AdamW, RAdam]}\n"
    )
    return p


def _fake_train(cfg):
    from types import SimpleNamespace

    run_dir = Path(cfg.output_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(run_dir=run_dir, run_id=cfg.run_name, metrics={"val/f1_macro": 0.5}, best_epoch=0)


def test_sweep_refuses_set_output_dir(tmp_path: Path) -> None:
    from cxrlab.sweep.runner import sweep
    from cxrlab.sweep.spec import SweepConfig, SweepError

    cfg = SweepConfig(
        sweep_file=_sweep_yaml(tmp_path), out=tmp_path / "sw", data="d", overrides=["output_dir=/elsewhere"]
    )
    with pytest.raises(SweepError, match="--set output_dir=/elsewhere: a sweep names and places every trial"):
        sweep(cfg, train_fn=_fake_train)


def test_resumed_sweep_with_other_trial_input_refuses(tmp_path: Path) -> None:
    from cxrlab.sweep.runner import sweep
    from cxrlab.sweep.spec import SweepConfig, SweepError

    splits = {}
    for version in ("v1", "v2"):  # two split directories: the data is fingerprinted by its dataset version
        splits[version] = tmp_path / f"split-{version}"
        splits[version].mkdir()
        (splits[version] / "split.json").write_text(json.dumps({"dataset_version": version}))
    copy_of_v1 = Path(shutil.copytree(splits["v1"], tmp_path / "copy-of-v1"))
    base = {"sweep_file": _sweep_yaml(tmp_path), "out": tmp_path / "sw", "data": str(splits["v1"]), "verbose": False}
    first = sweep(SweepConfig(**base, overrides=["epochs=2"]), train_fn=_fake_train)
    assert first.complete
    again = sweep(SweepConfig(**base, overrides=["epochs=2", "tracking.wandb=off"]), train_fn=_fake_train)
    assert again.complete and not again.ran_here  # the same trial input (tracking does not count): resumes
    with pytest.raises(SweepError, match=r"other trial settings \(epochs: 2 -> 3\)"):
        sweep(SweepConfig(**base, overrides=["epochs=3"]), train_fn=_fake_train)
    same_data = SweepConfig(**{**base, "data": str(copy_of_v1)}, overrides=["epochs=2"])  # e.g. another machine
    assert sweep(same_data, train_fn=_fake_train).complete
    with pytest.raises(SweepError, match="other trial settings .data: 'dataset_version:v1' -> 'dataset_version:v2'"):
        sweep(SweepConfig(**{**base, "data": str(splits["v2"])}, overrides=["epochs=2"]), train_fn=_fake_train)
    cfg_file = tmp_path / "base.yaml"
    cfg_file.write_text("epochs: 2\nlearning_rate: 0.01\n")
    with pytest.raises(SweepError, match="learning_rate"):
        sweep(SweepConfig(**base, base_config=cfg_file), train_fn=_fake_train)


class _CkptTrain:
    """A fake trial that writes what a real run writes (checkpoints + bundle); interrupts on call ``interrupt_on``."""

    def __init__(self, interrupt_on: int | None = None) -> None:
        self.calls, self.interrupt_on = 0, interrupt_on

    def __call__(self, cfg):
        from types import SimpleNamespace

        self.calls += 1
        run_dir = Path(cfg.output_dir) / cfg.run_name
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "bundle").mkdir(exist_ok=True)
        for f in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "bundle/model.safetensors"):
            (run_dir / f).write_bytes(b"x" * 1000)
        if self.calls == self.interrupt_on:
            raise KeyboardInterrupt
        score = 0.9 if cfg.optimizer == "RAdam" else 0.5
        return SimpleNamespace(run_dir=run_dir, run_id=cfg.run_name, metrics={"val/f1_macro": score}, best_epoch=0)


def test_sweep_keeps_bundles_and_the_best_trials_last_ckpt_only(tmp_path: Path) -> None:
    from cxrlab.sweep.runner import sweep
    from cxrlab.sweep.spec import SweepConfig

    base = {"sweep_file": _sweep_yaml(tmp_path), "data": "d", "verbose": False}
    with pytest.raises(KeyboardInterrupt):
        sweep(SweepConfig(**base, out=tmp_path / "sw"), train_fn=_CkptTrain(interrupt_on=2))
    runs = tmp_path / "sw" / "s" / "runs"
    assert (runs / "s-t001" / "checkpoints" / "last.ckpt").is_file()  # the interrupted trial's leftovers
    res = sweep(SweepConfig(**base, out=tmp_path / "sw"), train_fn=_CkptTrain())
    assert res.complete and res.best["params"] == {"optimizer": "RAdam"}
    best_dir, other_dir = Path(res.best["run_dir"]), runs / "s-t000"
    assert sorted(p.name for p in (best_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert (best_dir / "bundle" / "model.safetensors").is_file() and (other_dir / "bundle").is_dir()
    assert not (other_dir / "checkpoints").exists() and not (runs / "s-t001").exists()
    assert res.freed_bytes == 2000 + 1000 + 3000 and res.disk_bytes > 0  # t000 ckpts, best.ckpt, t001

    kept = sweep(SweepConfig(**base, out=tmp_path / "all", keep="all"), train_fn=_CkptTrain())
    assert all((Path(r["run_dir"]) / "checkpoints" / "best.ckpt").is_file() for r in kept.rows)


# ------------------------------------------------------------------------------------- train (slow: trains)


def _train_sets(split: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model_name={TEST_MODEL}",
        "pre_trained=false",
        "img_size=[48,48]",
        "batch_size=8",
        "epochs=2",
        "threads=1",
        f"data={split}",
        f"output_dir={out}",
        "tracking.wandb=off",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.trains
def test_train_warns_on_a_class_absent_from_test_and_resume_survives_a_truncated_last_ckpt(
    phantom_split: Path, tmp_path: Path
) -> None:
    import pandas as pd

    from cxrlab.config import ConfigError, load_config
    from cxrlab.errors import RunError
    from cxrlab.training.rundir import resume_config
    from cxrlab.training.train import train

    split = Path(shutil.copytree(phantom_split, tmp_path / "split"))
    df = pd.read_csv(split / "split.csv", dtype=str, keep_default_na=False)
    df[~((df["split"] == "test") & (df["label"] == "COVID19"))].to_csv(split / "split.csv", index=False)
    out = tmp_path / "runs"

    # a typo in model_name fails before anything is written
    with pytest.raises(ConfigError, match="notamodel"):
        train(load_config(None, _train_sets(split, out, "model_name=notamodel", "run_name=typo")))
    assert not out.exists() or not any(out.iterdir())

    res = train(load_config(None, _train_sets(split, out, "run_name=r", "evaluate=test", "keep=all")))
    assert "test/recall_COVID19" not in res.metrics and "test/recall_NORMAL" in res.metrics
    assert any("COVID19 has no images in the test split" in w for w in res.warnings)
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert "test/recall_COVID19" not in summary["metrics"]
    assert summary["disk_bytes"] == res.disk_bytes > (res.run_dir / "bundle" / WEIGHTS_FILE).stat().st_size

    ckpts = res.run_dir / "checkpoints"
    last, best = ckpts / "last.ckpt", ckpts / "best.ckpt"
    best_copy = best.read_bytes()
    last.write_bytes(last.read_bytes()[:1000])  # a crash while last.ckpt was written
    with pytest.raises(RunError, match="Resume from the best checkpoint instead: cxrlab train --resume"):
        train(resume_config(last, ["epochs=3"]), resume=last)  # named explicitly: no silent fallback
    resumed = train(resume_config(res.run_dir, ["epochs=3"]), resume=res.run_dir)
    assert "is damaged" in resumed.warnings[0] and "resuming from" in resumed.warnings[0]
    assert resumed.epochs_run == 3

    last.write_bytes(b"")
    best.write_bytes(best_copy[:500])
    with pytest.raises(RunError, match=r"is damaged too\. Start again: cxrlab train --config"):
        train(resume_config(res.run_dir, ["epochs=4"]), resume=res.run_dir)


# ------------------------------------------------------------------------------ acceptance: hostile inputs


def test_hostile_inputs_script_every_file_accounted_for_same_verdict_no_traceback(tmp_path: Path) -> None:
    """benchmarks/hostile_inputs.py: the bad-input folder through ingest, predict and serve (its own tiny bundle)."""
    import importlib.util

    pytest.importorskip("pydicom.data")
    spec = importlib.util.spec_from_file_location("hostile_inputs", REPO / "benchmarks" / "hostile_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hostile_inputs"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    report = mod.run(tmp_path / "work")
    mod.print_report(report)
    assert len(report.rows) >= 20
    assert not report.missing and not report.disagree and not report.tracebacks
    by_file = {r["file"]: r for r in report.rows}
    assert by_file["NORMAL/bomb.png"]["serve"].text.startswith("413")
    assert by_file["NORMAL/linked/linked.png"]["agree"] == "yes" and by_file["NORMAL/linked/linked.png"]["ingest"].ok
    assert [r["agree"] for r in report.rows].count("name") == 1
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "work").rglob("*.log"))
    assert "Traceback" not in logs
