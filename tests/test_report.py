"""Contracts of cxrlab.report.pages: self-contained pages (no external resources) that render their figures offline."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cxrlab.analysis.evaluate import EvalConfig, evaluate
from cxrlab.report.pages import write_run_report

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


@pytest.fixture(scope="module")
def run_dir(phantom_dir: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as train writes it (bundle, summary, metrics.csv), evaluated, with an explanation and a
    pipeline audit beside it."""
    base = tmp_path_factory.mktemp("pipe")
    split = base / "split"
    split.mkdir()
    rows = []
    for c in CLASSES:
        for i, f in enumerate(sorted((phantom_dir / c).glob("*.png"))[:10]):
            rows.append({"path": str(f), "label": c, "split": "test" if i < 4 else "train"})
    pd.DataFrame(rows).to_csv(split / "split.csv", index=False)
    (split / "split.json").write_text(json.dumps({"dataset_version": "v-test", "classes": CLASSES}))
    run = base / "runs" / "r1"
    shutil.copytree(tiny_bundle, run / "bundle")
    (run / "summary.json").write_text(json.dumps({"run_id": "r1", "data": str(split), "best_epoch": 2}))
    (run / "config.yaml").write_text("model_name: test_efficientnet\nepochs: 4\n")
    pd.DataFrame(
        {
            "epoch": [0, 1, 2, 3],
            "train/loss": [1.1, 0.9, 0.7, 0.6],
            "val/loss": [1.0, 0.8, 0.75, 0.8],
            "val/f1_macro": [0.4, 0.6, 0.7, 0.68],
            "val/accuracy": [0.45, 0.62, 0.71, 0.7],
        }
    ).to_csv(run / "metrics.csv", index=False)
    evaluate(EvalConfig(target=run, n_boot=100, progress=False, wandb="off"))
    ex = run / "explain-test"
    ex.mkdir()
    (ex / "explain.html").write_text("<html><body>explanations</body></html>")
    (ex / "attention.json").write_text(
        json.dumps({"subset": "all", "split": "test", "summary": {"in_lungs": 0.61, "on_text": 0.02, "n_images": 12}})
    )
    audit = base / "audit"
    audit.mkdir()
    (audit / "audit.json").write_text(
        json.dumps(
            {
                "confound": {
                    "chance_balanced_accuracy": 0.3333,
                    "groups": {"image size/aspect": {"balanced_accuracy": 0.93, "features": ["width", "aspect"]}},
                    "all": {"balanced_accuracy": 0.95},
                },
                "warnings": ["image size predicts the label"],
                "text_share": {"COVID19": 0.4, "NORMAL": 0.05},
            }
        )
    )
    (audit / "audit.html").write_text("<html><body>audit</body></html>")
    return run


def _assert_self_contained(html: str) -> None:
    assert not EXTERNAL.search(html), EXTERNAL.search(html).group(0)  # type: ignore[union-attr]
    assert "<script src" not in html.lower() and "<link" not in html.lower()
    imgs = re.findall(r"<img[^>]*\ssrc=\"([^\"]+)\"", html)
    assert imgs and all(s.startswith("data:image/png;base64,") for s in imgs)


def test_eval_report_is_self_contained(run_dir: Path) -> None:
    html = (run_dir / "eval-test" / "report.html").read_text()
    _assert_self_contained(html)
    assert "confusion matrix" in html and "reliability" in html and "95% CI" in html


def test_run_report_sections_and_links(run_dir: Path) -> None:
    path = write_run_report(run_dir)
    assert path == run_dir / "report.html"
    html = path.read_text()
    _assert_self_contained(html)
    assert "training curves" in html  # the metrics.csv figure
    assert "Data audit" in html and "image size predicts the label" in html and "0.930" in html
    assert "attention in lungs" in html and "0.610" in html
    # relative links resolve from the page's folder (the page keeps working when the folder moves)
    links = re.findall(r"href='([^']+)'", html)
    assert links and all((path.parent / link).is_file() for link in links), links
    # a page elsewhere links back correctly too
    top = write_run_report(run_dir, out=run_dir.parent.parent / "report.html")
    for link in re.findall(r"href='([^']+)'", top.read_text()):
        assert (top.parent / link).is_file(), link


def test_report_cli_regenerates(run_dir: Path) -> None:
    from cxrlab.cli import main

    (run_dir / "report.html").unlink(missing_ok=True)
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file()
    assert main(["report", str(run_dir / "nonexistent")]) == 2


@pytest.mark.browser
def test_report_renders_offline_in_chromium(run_dir: Path, browser, tmp_path: Path) -> None:
    page_path = write_run_report(run_dir)
    requests: list[str] = []

    def route(r) -> None:  # noqa: ANN001 - playwright Route
        url = r.request.url
        if url.startswith(("file:", "data:")):
            r.continue_()
        else:  # no network: anything else is an external dependency of the page
            requests.append(url)
            r.abort()

    ctx = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})
    try:
        ctx.route("**/*", route)
        page = ctx.new_page()
        page.goto(page_path.as_uri(), wait_until="load")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        title = page.title()
    finally:
        ctx.close()
    assert shot.stat().st_size > 10_000
    assert len(widths) >= 4 and all(w > 0 for w in widths), widths  # curves, confusion, reliability, ROC, ...
    assert requests == []
    assert "r1" in title
