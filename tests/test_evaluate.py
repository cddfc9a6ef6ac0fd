"""Contracts of cxrlab.analysis.evaluate: statistics against hand-computed cases, evaluate/compare on bundles +
phantoms."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlab.analysis.compare import CompareConfig, compare, make_verdict
from cxrlab.analysis.evaluate import EvalConfig, evaluate
from cxrlab.analysis.metrics import (
    bootstrap_confusions,
    bootstrap_indices,
    compute_metrics,
    confusion_matrix,
    expected_calibration_error,
    mcnemar_test,
    metrics_from_confusion,
    paired_bootstrap_diff,
    percentile_ci,
)
from cxrlab.errors import EvalError

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]


# --------------------------------------------------------------------------------------------- statistics


def test_mcnemar_exact_hand_computed() -> None:
    # b=1, c=6: P(X<=1 | n=7, 1/2) = (1 + 7) / 128; two-sided = 16/128 = 0.125
    r = mcnemar_test(1, 6)
    assert r.p_exact == pytest.approx(0.125, abs=1e-12)
    assert r.p_midp == pytest.approx(0.125 - 7 / 128, abs=1e-12)  # exact minus P(X = 1)
    assert mcnemar_test(6, 1).p_exact == pytest.approx(0.125)  # symmetric in b, c
    assert mcnemar_test(0, 5).p_exact == pytest.approx(2 / 32)
    assert mcnemar_test(0, 0).p_exact == 1.0  # no discordant pairs: no evidence of a difference
    assert mcnemar_test(3, 3).p_exact == pytest.approx(1.0)
    # continuity-corrected chi-square: (|1-6|-1)^2 / 7
    assert r.chi2 == pytest.approx(16 / 7)


def test_percentile_bootstrap_contains_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    correct = rng.random(150) < 0.9
    idx = bootstrap_indices(150, 1000, seed=7)
    samples = correct[idx].mean(axis=1)
    lo, hi = percentile_ci(samples)
    assert lo <= correct.mean() <= hi
    assert 0.8 < lo < hi < 1.0
    # seeded: same seed, same indices; another seed, other indices
    assert np.array_equal(idx, bootstrap_indices(150, 1000, seed=7))
    assert not np.array_equal(idx, bootstrap_indices(150, 1000, seed=8))
    # degenerate: all correct -> the interval collapses onto 1
    assert percentile_ci(np.ones(150, bool)[idx].mean(axis=1)) == (1.0, 1.0)
    # NaN resamples (statistic undefined) are ignored, all-NaN gives NaN
    assert percentile_ci(np.array([np.nan, 0.5, 0.5])) == (0.5, 0.5)
    assert all(math.isnan(v) for v in percentile_ci(np.array([np.nan])))


def test_paired_bootstrap_difference() -> None:
    a = np.array([1] * 140 + [0] * 10, bool)
    b = a.copy()
    b[:3] = False  # challenger loses 3 items
    b[140:141] = True  # and wins 1
    d, (lo, hi) = paired_bootstrap_diff(a, b, 2000, seed=0)
    assert d == pytest.approx(-2 / 150)
    assert lo <= d <= hi and lo < 0
    assert paired_bootstrap_diff(a, b, 2000, seed=0) == (d, (lo, hi))
    # identical predictions: the difference and its CI are exactly 0
    assert paired_bootstrap_diff(a, a, 500, seed=1) == (0.0, (0.0, 0.0))


def test_metrics_from_confusion_hand_computed() -> None:
    cm = np.array([[5, 1], [2, 2]])
    m = metrics_from_confusion(cm)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["recall"] == pytest.approx([5 / 6, 0.5])
    assert m["precision"] == pytest.approx([5 / 7, 2 / 3])
    f1 = [2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6), 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)]
    assert m["f1"] == pytest.approx(f1)
    assert m["f1_macro"] == pytest.approx(np.mean(f1))
    # batched form gives the same numbers
    mb = metrics_from_confusion(np.stack([cm, cm]))
    assert mb["f1_macro"] == pytest.approx([np.mean(f1)] * 2)


def test_bootstrap_confusions_match_direct_counts() -> None:
    rng = np.random.default_rng(0)
    yt, yp = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    idx = bootstrap_indices(50, 20, seed=1)
    cms = bootstrap_confusions(yt, yp, 3, idx)
    assert cms.shape == (20, 3, 3)
    for b in (0, 7, 19):
        assert np.array_equal(cms[b], confusion_matrix(yt[idx[b]], yp[idx[b]], 3))
    assert (cms.sum(axis=(1, 2)) == 50).all()


def test_ece_constructed() -> None:
    # perfectly calibrated: in each confidence bin the accuracy equals the confidence
    probs, y = [], []
    for conf, n_right, n in ((0.7, 7, 10), (0.9, 18, 20), (0.5, 5, 10)):
        for i in range(n):
            p = np.array([conf, (1 - conf) / 2, (1 - conf) / 2])
            probs.append(p)
            y.append(0 if i < n_right else 1)
    ece, rel = expected_calibration_error(np.array(probs), np.array(y), n_bins=15)
    assert ece == pytest.approx(0.0, abs=1e-9)
    assert rel["count"].sum() == 40 and len(rel) == 15
    # over-confident: confidence 0.9 everywhere, half right -> ECE = 0.4
    probs = np.tile([0.9, 0.05, 0.05], (100, 1))
    y = np.array([0] * 50 + [1] * 50)
    ece, _ = expected_calibration_error(probs, y, n_bins=15)
    assert ece == pytest.approx(0.4)


def test_compute_metrics_agrees_with_sklearn() -> None:
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    res = compute_metrics(y, probs, CLASSES, prefix="test", n_boot=200, seed=0)
    m, pred = res["metrics"], probs.argmax(1)
    assert m["test/f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["test/precision_macro"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["test/recall_macro"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["test/auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["test/recall_COVID19"] == pytest.approx(recall_score(y == 0, pred == 0))
    assert m["test/acc_NORMAL"] == pytest.approx(accuracy_score(y == 1, pred == 1))  # one-vs-rest, as in training
    assert res["confusion"].sum() == 200
    for k, (lo, hi) in res["ci"].items():
        assert lo <= m[k] <= hi, k
    assert 0.0 <= m["test/ece"] <= 1.0


def test_absent_class_is_undefined_not_zero() -> None:
    y = np.array([0, 0, 1, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    res = compute_metrics(y, probs, CLASSES, prefix="ext", n_boot=50)
    assert res["absent"] == ["PNEUMONIA"] and res["present"] == ["COVID19", "NORMAL"]
    m = res["metrics"]
    assert "ext/recall_PNEUMONIA" not in m
    # macro recall over the two present classes only: (1/2 + 2/3) / 2
    assert m["ext/recall_macro"] == pytest.approx((0.5 + 2 / 3) / 2)
    row = res["per_class"].set_index("class").loc["PNEUMONIA"]
    assert not row["present"] and math.isnan(row["recall"]) and row["fp"] == 1


def test_verdict_text() -> None:
    sig, text = make_verdict(150, mcnemar_test(4, 5), 1 / 150, (-0.033, 0.047), 0.05)
    assert not sig and text.startswith("no significant difference at n=150: McNemar exact p=1")
    assert "+0.7 pt" in text and "[-3.3, +4.7]" in text
    sig, text = make_verdict(150, mcnemar_test(0, 12), 0.08, (0.04, 0.12), 0.05)
    assert sig and "challenger is more accurate" in text


# --------------------------------------------------------------------------------------------- fixtures


def _make_split(phantom_dir: Path, out: Path, n_test: int = 4, n_val: int = 4) -> Path:
    """A split.csv/split.json (manifest.py schema) over the phantoms: per class n_val val, n_test test."""
    rows = []
    for c in CLASSES:
        files = sorted((phantom_dir / c).glob("*.png"))
        for i, f in enumerate(files):
            s = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            rows.append({"path": str(f.resolve()), "label": c, "patient_id": f.stem, "split": s, "group": f.stem})
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "split.csv", index=False)
    (out / "split.json").write_text(json.dumps({"dataset_version": "phantom-test-v0", "classes": CLASSES}))
    return out


def _make_run(tmp: Path, bundle: Path, split_dir: Path, name: str = "run-a") -> Path:
    run = tmp / name
    shutil.copytree(bundle, run / "bundle")
    (run / "summary.json").write_text(
        json.dumps({"run_id": name, "data": str(split_dir), "dataset_version": "phantom-test-v0", "best_epoch": 0})
    )
    return run


def _other_bundle(tmp: Path) -> Path:
    import timm
    import torch

    from cxrlab.inference.bundle import BundleMeta, save_bundle
    from cxrlab.transforms import norm_constants

    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3, in_chans=3)
    mean, std = norm_constants(3)
    meta = BundleMeta("test_efficientnet", CLASSES, (64, 64), 3, mean, std, dataset_version="test")
    return save_bundle(model, meta, tmp / "bundle-b")


@pytest.fixture(scope="module")
def small_data(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 phantoms per class (keeps the suite fast; the statistics are tested on constructed arrays)."""
    out = tmp_path_factory.mktemp("small")
    for c in CLASSES:
        (out / c).mkdir()
        for f in sorted((phantom_dir / c).glob("*.png"))[:8]:
            shutil.copy(f, out / c / f.name)
    return out


@pytest.fixture(scope="module")
def split_dir(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_split(phantom_dir, tmp_path_factory.mktemp("split"))


@pytest.fixture(scope="module")
def run_eval(tiny_bundle: Path, split_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    run = _make_run(tmp_path_factory.mktemp("runs"), tiny_bundle, split_dir)
    return run, evaluate(EvalConfig(target=run, split="test", n_boot=300, progress=False, wandb="off"))


# --------------------------------------------------------------------------------------------- evaluate


def test_evaluate_run_split_writes_everything(run_eval) -> None:
    run, res = run_eval
    out = run / "eval-test"
    assert res.out_dir == out
    for name in ("metrics.json", "predictions.csv", "confusion_matrix.png", "confusion_matrix.csv", "reliability.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "report.html").is_file()
    assert res.n == 12 and res.confusion.sum() == 12  # 4 test images per class
    assert res.dataset_version == "phantom-test-v0"
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["n"] == 12 and np.array(doc["confusion_matrix"]).sum() == 12
    for key in ("test/accuracy", "test/f1_macro", "test/recall_COVID19"):
        lo, hi = doc["ci"][key]
        assert lo <= doc["metrics"][key] <= hi
    assert 0.0 <= doc["metrics"]["test/ece"] <= 1.0
    assert {"test/precision_macro", "test/recall_macro", "test/auc_macro", "test/acc_NORMAL"} <= set(doc["metrics"])
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns[:3]) == ["path", "label", "prediction"]
    assert {f"p_{c}" for c in CLASSES} <= set(pred.columns)
    assert np.allclose(pred[[f"p_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-4)
    cm = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert list(cm.columns) == CLASSES and cm.to_numpy().sum() == 12
    # the table is the confusion of the predictions
    assert np.array_equal(
        cm.to_numpy(),
        pd.crosstab(pred["label"], pred["prediction"]).reindex(index=CLASSES, columns=CLASSES, fill_value=0).to_numpy(),
    )


def test_evaluate_val_split_and_seeded_cis(run_eval, tmp_path: Path) -> None:
    run, res = run_eval
    again = evaluate(EvalConfig(target=run, split="test", n_boot=300, out=tmp_path / "a", progress=False, report=False))
    assert again.ci == res.ci and again.metrics == res.metrics
    val = evaluate(EvalConfig(target=run, split="val", n_boot=0, out=tmp_path / "v", progress=False, report=False))
    assert val.prefix == "val" and "val/accuracy" in val.metrics and val.ci == {}


def test_evaluate_subset_of_classes_says_which_are_absent(tiny_bundle: Path, small_data: Path, tmp_path: Path):
    from cxrlab.cli import main

    data = tmp_path / "ext"
    shutil.copytree(small_data / "NORMAL", data / "normal")  # name mapped case-insensitively
    shutil.copytree(small_data / "COVID19", data / "COVID-19")
    res = evaluate(EvalConfig(target=tiny_bundle, data=data, out=tmp_path / "o", n_boot=100, progress=False))
    assert res.absent_classes == ["PNEUMONIA"] and res.n == 16
    assert "ext/recall_PNEUMONIA" not in res.metrics
    assert set(res.predictions["label"]) == {"NORMAL", "COVID19"}
    html = (tmp_path / "o" / "report.html").read_text()
    assert "absent" in html and "PNEUMONIA" in html
    rc = main(
        [
            "evaluate",
            str(tiny_bundle),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "c"),
            "--n-boot",
            "50",
            "--no-progress",
        ]
    )
    assert rc == 0


def test_evaluate_cli_prints_absent(tiny_bundle: Path, small_data: Path, tmp_path: Path, capsys) -> None:
    from cxrlab.cli import main

    data = tmp_path / "ext"
    shutil.copytree(small_data / "PNEUMONIA", data / "PNEUMONIA")
    rc = main(
        [
            "evaluate",
            str(tiny_bundle),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "c"),
            "--n-boot",
            "50",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "classes absent from this data" in out and "COVID19, NORMAL" in out


def test_evaluate_unknown_class_and_corrupt_file(tiny_bundle: Path, small_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(small_data / "NORMAL", bad / "NORMAL")
    (bad / "TUBERCULOSIS").mkdir()
    with pytest.raises(EvalError, match="TUBERCULOSIS"):
        evaluate(EvalConfig(target=tiny_bundle, data=bad, out=tmp_path / "o", progress=False))
    shutil.rmtree(bad / "TUBERCULOSIS")
    (bad / "NORMAL" / "broken.png").write_bytes(b"not an image at all")
    (bad / "NORMAL" / "empty.jpg").write_bytes(b"")
    res = evaluate(EvalConfig(target=tiny_bundle, data=bad, out=tmp_path / "o", n_boot=0, progress=False))
    assert res.n == 8 and len(res.skipped) == 2
    assert {Path(s["path"]).name for s in res.skipped} == {"broken.png", "empty.jpg"}
    assert all(s["reason"] for s in res.skipped)
    assert (tmp_path / "o" / "skipped.csv").is_file()


def test_evaluate_manifest_csv_and_missing_split(tiny_bundle: Path, split_dir: Path, tmp_path: Path) -> None:
    res = evaluate(
        EvalConfig(
            target=tiny_bundle,
            data=split_dir / "split.csv",
            split="val",
            out=tmp_path / "m",
            n_boot=0,
            progress=False,
            report=False,
        )
    )
    assert res.n == 12 and res.prefix == "ext"
    with pytest.raises(EvalError, match="--data"):  # a bare bundle records no split
        evaluate(EvalConfig(target=tiny_bundle, out=tmp_path / "x", progress=False))


# --------------------------------------------------------------------------------------------- compare


def test_compare_two_bundles(tiny_bundle: Path, small_data: Path, tmp_path: Path, capsys) -> None:
    from cxrlab.cli import main

    other = _other_bundle(tmp_path)
    r = compare(
        CompareConfig(
            baseline=tiny_bundle,
            challenger=other,
            data=small_data,
            out=tmp_path / "cmp",
            n_boot=300,
            progress=False,
            report=False,
        )
    )
    assert r.n == 24
    assert r.mcnemar.b + r.mcnemar.c + r.both_right + r.both_wrong == 24
    acc_b, acc_c = r.baseline.metrics["ext/accuracy"], r.challenger.metrics["ext/accuracy"]
    assert r.accuracy_diff == pytest.approx(acc_c - acc_b)
    assert r.accuracy_diff == pytest.approx((r.mcnemar.c - r.mcnemar.b) / 24)
    lo, hi = r.accuracy_diff_ci
    assert lo <= r.accuracy_diff <= hi
    assert r.errors["class"].iloc[0] == "COVID19"  # the costly error first
    assert r.verdict.startswith(("no significant difference at n=24", "significant difference at n=24"))
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert doc["mcnemar"]["p_exact"] == pytest.approx(r.mcnemar.p_exact)
    assert doc["verdict"] == r.verdict
    rc = main(
        [
            "compare",
            str(tiny_bundle),
            str(other),
            "--data",
            str(small_data),
            "--out",
            str(tmp_path / "c2"),
            "--n-boot",
            "100",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "McNemar" in out and f"p={r.mcnemar.p_exact:.4g}" in out and "verdict" in out
    for name in ("compare.json", "compare.html", "confusion_matrices.png", "baseline/report.html"):
        assert (tmp_path / "c2" / name).is_file(), name


def test_compare_refuses_different_splits(tiny_bundle: Path, phantom_dir: Path, split_dir: Path, tmp_path: Path):
    other_split = _make_split(phantom_dir, tmp_path / "split2", n_test=3, n_val=5)
    a = _make_run(tmp_path, tiny_bundle, split_dir, "a")
    b = _make_run(tmp_path, tiny_bundle, other_split, "b")
    with pytest.raises(EvalError, match="different splits"):
        compare(CompareConfig(baseline=a, challenger=b, out=tmp_path / "cmp", progress=False))
    # same model on the same split: no discordant pairs, p = 1
    c = _make_run(tmp_path, tiny_bundle, split_dir, "c")
    for run, lungs in ((a, 0.7), (c, 0.4)):  # explanations as cxrlab.analysis.explain writes them: shown side by side
        (run / "explain-test").mkdir()
        doc = {"subset": "all", "split": "test", "summary": {"in_lungs": lungs, "on_text": 0.01, "n_images": 12}}
        (run / "explain-test" / "attention.json").write_text(json.dumps(doc))
    r = compare(
        CompareConfig(baseline=a, challenger=c, out=tmp_path / "same", n_boot=100, progress=False, report=False)
    )
    assert r.mcnemar.b == r.mcnemar.c == 0 and r.mcnemar.p_exact == 1.0 and not r.significant
    att = r.attention.set_index("score")
    assert att.loc["in_lungs", "baseline"] == 0.7 and att.loc["in_lungs", "challenger"] == 0.4


def test_evaluation_goes_to_the_runs_wandb_run(tiny_bundle: Path, split_dir: Path, tmp_path: Path) -> None:
    run = _make_run(tmp_path, tiny_bundle, split_dir, "tracked")
    (run / "wandb.json").write_text(json.dumps({"id": "evaltest1", "mode": "offline"}))  # as train writes it
    res = evaluate(EvalConfig(target=run, n_boot=0, progress=False, report=False))
    assert res.wandb_logged
    runs = list((run / "wandb").glob("offline-run-*-evaltest1"))
    assert runs and list(runs[0].glob("run-evaltest1.wandb"))  # resumed the same run id, inside the run dir
    # a run without W&B tracking is left alone
    plain = _make_run(tmp_path, tiny_bundle, split_dir, "plain")
    assert not evaluate(EvalConfig(target=plain, n_boot=0, progress=False, report=False)).wandb_logged
    assert not (plain / "wandb").exists()
