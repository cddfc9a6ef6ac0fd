"""Every HTML page cxrlab writes, rendered from one small fixed demo and photographed in headless Chromium; and the
comparison of two such renderings (e.g. before and after a change to the page templates).

    # the demo's data and models are made once in WORK (phantoms, untrained tiny models: seconds on 2 cores);
    # each render rebuilds every page in place with the cxrlab on PYTHONPATH and copies HTML, text and PNG to OUT
    PYTHONPATH=src python benchmarks/page_screenshots.py render --work /tmp/pages-work --out /tmp/screens/after
    python benchmarks/page_screenshots.py compare /tmp/screens/before /tmp/screens/after

``compare`` prints one row per page: whether the visible text (``document.body.innerText``) is identical, and
the share of pixels that differ between the two full-page screenshots (a size change counts every pixel outside
the common area as different). Pages are built at the same paths by both renderings, so the paths printed on a
page do not make the texts differ.

Pages: the data audit, an evaluation, a run, baseline vs challenger, the explanation table, the similar-image
gallery, leave-source-out validation, a sweep's parallel coordinates, and the two web services (prediction,
review) served by uvicorn on loopback.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]
CHROMIUM = os.environ.get("CXRLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
TINY = ["model_name=test_efficientnet", "pre_trained=false", "img_size=[32,32]", "batch_size=16", "epochs=1",
        "threads=1", "tracking.wandb=off", "trainer.enable_progress_bar=false"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ the demo


def _bundle(out: Path, seed: int) -> Path:
    import timm
    import torch

    from cxrlab.inference.bundle import BundleMeta, save_bundle
    from cxrlab.transforms import norm_constants

    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3, in_chans=3)
    mean, std = norm_constants(3)
    meta = BundleMeta(model_name="test_efficientnet", class_names=CLASSES, img_size=(64, 64), in_chans=3,
                      mean=mean, std=std, dataset_version="demo")  # fmt: skip
    return save_bundle(model, meta, out)


def _run(work: Path, name: str, seed: int, split_dir: Path) -> Path:
    """A run directory as training leaves it (bundle, summary, config, metrics.csv), from an untrained model."""
    import pandas as pd

    run = work / "runs" / name
    if (run / "summary.json").is_file():
        return run
    _bundle(run / "bundle", seed)
    (run / "summary.json").write_text(json.dumps({"run_id": name, "data": str(split_dir), "best_epoch": 2}))
    (run / "config.yaml").write_text(f"model_name: test_efficientnet\nepochs: 4\ndata: {split_dir}\n")
    curves = {"epoch": [0, 1, 2, 3], "train/loss": [1.1, 0.9, 0.7, 0.6], "val/loss": [1.0, 0.8, 0.75, 0.8],
              "val/f1_macro": [0.4, 0.6, 0.7, 0.68], "val/accuracy": [0.45, 0.62, 0.71, 0.7]}  # fmt: skip
    pd.DataFrame(curves).to_csv(run / "metrics.csv", index=False)
    return run


def make_demo(work: Path) -> dict[str, Path]:
    """Two sites of phantoms (one with a SOURCES.csv), their manifest and split, two untrained runs and a pool of
    unlabelled phantoms; made once, reused by every rendering."""
    from cxrlab.data.ingest import IngestConfig, ingest
    from cxrlab.data.split import SplitConfig, split
    from cxrlab.data.synth import SynthConfig, generate

    a, b, pool = work / "site-a", work / "site-b", work / "pool"
    if not (work / "split" / "split.csv").is_file():
        generate(SynthConfig(out=a, n_per_class=12, size=64, seed=1, shortcut_class="COVID19", shortcut_prob=0.5))
        generate(SynthConfig(out=b, n_per_class=12, size=64, seed=101))
        generate(SynthConfig(out=pool, n_per_class=6, size=64, seed=202))
        with open(a / "SOURCES.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "class", "source"])
            for c in CLASSES:
                for p in sorted((a / c).iterdir()):
                    w.writerow([f"{c}/{p.name}", c, "x" if c == "COVID19" else "y"])
        ingest(IngestConfig(src=a, extra_src=(b,), out=work / "manifest", workers=0, progress=False))
        split(SplitConfig(manifest=work / "manifest", out=work / "split", fractions=(0.6, 0.2, 0.2), progress=False))
    return {
        "manifest": work / "manifest",
        "split": work / "split",
        "pool": pool,
        "r1": _run(work, "r1", 0, work / "split"),
        "r2": _run(work, "r2", 1, work / "split"),
    }


# ------------------------------------------------------------------------------------------------ the pages


def build_pages(work: Path, d: dict[str, Path]) -> dict[str, Path]:
    """Every file page, rebuilt in place by the cxrlab on ``sys.path``: name -> its HTML file."""
    from cxrlab.analysis.compare import CompareConfig, compare
    from cxrlab.analysis.evaluate import EvalConfig, evaluate
    from cxrlab.analysis.explain import ExplainConfig, explain
    from cxrlab.analysis.mine import MineConfig, mine
    from cxrlab.analysis.validate import ValidateConfig, validate
    from cxrlab.data.audit import AuditConfig, audit
    from cxrlab.report.pages import write_run_report

    pages: dict[str, Path] = {}
    a = audit(AuditConfig(data=d["manifest"], out=work / "audit", workers=0, progress=False, gallery_per_flag=4))
    pages["audit"] = a.html_path
    for run in (d["r1"], d["r2"]):
        evaluate(EvalConfig(target=run, n_boot=100, progress=False, wandb="off", device="cpu"))
        explain(ExplainConfig(target=run, split="test", wandb="off", progress=False, device="cpu"))
    pages["eval"] = d["r1"] / "eval-test" / "report.html"
    pages["explain"] = d["r1"] / "explain-test" / "explain.html"
    pages["run"] = write_run_report(d["r1"])
    c = compare(CompareConfig(baseline=d["r1"], challenger=d["r2"], out=work / "compare", n_boot=100,
                              progress=False, device="cpu"))  # fmt: skip
    pages["compare"] = c.paths["report"]
    m = mine(MineConfig(target=d["r1"], pool=d["pool"], k=4, max_queries=4, device="cpu", progress=False))
    pages["mine"] = m.gallery
    v = validate(
        ValidateConfig(
            manifest=d["manifest"],
            out=work / "validate",
            overrides=TINY,
            groups=[["x"], ["x", "site-b"]],
            fractions=(0.6, 0.2, 0.2),
            n_boot=50,
            progress=False,
        ),  # fmt: skip
        log=lambda _: None,
    )
    pages["validate"] = v.out / "validate.html"
    pages["sweep"] = _sweep_page(work / "sweep" / "parallel_coordinates.html")
    return pages


def _sweep_page(path: Path) -> Path:
    """The sweep's parallel coordinates with the importance chart beside it, from six made-up trials."""
    from cxrlab.sweep.outputs import write_parcoords
    from cxrlab.sweep.spec import parse_sweep_spec

    spec = parse_sweep_spec(
        {"name": "demo", "method": "grid", "metric": {"name": "val/accuracy", "goal": "maximize"},
         "parameters": {"optimizer": {"values": ["AdamW", "RAdam"]}, "learning_rate": {"values": [1e-4, 1e-3]}}}
    )  # fmt: skip
    rows = []
    for i in range(6):
        acc = 0.5 + 0.05 * i
        metrics = {"val/accuracy": acc, "test/f1_macro": acc - 0.1, "test/recall_COVID19": acc + 0.1}
        rows.append({"trial": i, "status": "COMPLETE" if i != 4 else "PRUNED", "objective": acc if i != 4 else None,
                     "params": {"optimizer": ["AdamW", "RAdam"][i % 2], "learning_rate": [1e-4, 1e-3][i // 3]},
                     "metrics": metrics})  # fmt: skip
    imp = ({"learning_rate": 0.7, "optimizer": 0.3}, "fANOVA over 5 completed trials")
    return write_parcoords(rows, ["optimizer", "learning_rate"], spec, path, "sweep demo", imp)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(app) -> Iterator[str]:  # noqa: ANN001 - a FastAPI app
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        srv.should_exit = True
        thread.join(timeout=20)


def _shoot(browser, url: str, out: Path, name: str, ready: str | None = None) -> None:  # noqa: ANN001
    """Full-page screenshot, visible text and HTML of one page; nothing but file:, data: and loopback loads."""
    ctx = browser.new_context(viewport={"width": 1200, "height": 900}, device_scale_factor=1)
    blocked: list[str] = []

    def route(r) -> None:  # noqa: ANN001 - playwright Route
        u = r.request.url
        if u.startswith(("file:", "data:", "blob:", "http://127.0.0.1:")):
            r.continue_()
        else:
            blocked.append(u)
            r.abort()

    try:
        ctx.route("**/*", route)
        page = ctx.new_page()
        page.goto(url, wait_until="load")
        if ready:
            page.wait_for_selector(ready, timeout=60_000)
        page.evaluate(
            "async () => { for (const i of document.images) { i.loading = 'eager'; "
            "if (!i.complete) await new Promise(r => { i.onload = i.onerror = r; }); } await document.fonts.ready; }"
        )
        # two frames after the last image and font: without them the explain table's column widths came out
        # 1 px apart in 2 of 6 shots of one unchanged file
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        page.wait_for_timeout(300)  # plotly's first layout pass
        page.screenshot(path=str(out / f"{name}.png"), full_page=True)
        (out / f"{name}.txt").write_text(page.evaluate("document.body.innerText"), encoding="utf-8")
        if url.startswith("http"):  # a served page: its HTML as served (a file page is copied by the caller)
            (out / f"{name}.html").write_text(page.content(), encoding="utf-8")
    finally:
        ctx.close()
    if blocked:
        print(f"{name}: blocked requests {blocked}", file=sys.stderr)


def render(work: Path, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    from cxrlab.review.app import ReviewSettings, create_review_app
    from cxrlab.review.core import ReviewConfig, load_queue
    from cxrlab.review.store import ReviewStore
    from cxrlab.serve import ServeSettings, create_app

    os.environ.setdefault("WANDB_MODE", "offline")
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    d = make_demo(work)
    t0 = time.perf_counter()
    pages = build_pages(work, d)
    print(f"pages built in {time.perf_counter() - t0:.1f} s")
    with sync_playwright() as pw:

        def shoot(url: str, name: str, ready: str | None = None) -> None:
            # a fresh browser per page: what one page loaded (fonts, caches) cannot change another's layout
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                _shoot(browser, url, out, name, ready)
            finally:
                browser.close()

        for name, path in pages.items():
            shoot(path.as_uri(), name)
            shutil.copyfile(path, out / f"{name}.html")  # the file as written (the browser's DOM differs)
        with _serving(create_app(d["r1"] / "bundle", ServeSettings(device="cpu"))) as url:
            shoot(url, "serve", "#model:has-text('test_efficientnet')")
        db = work / "review.db"
        db.unlink(missing_ok=True)
        q = load_queue(ReviewConfig(run=d["r1"], db=f"sqlite:///{db}", sample=10))
        app = create_review_app(q, ReviewStore(q.db_url), ReviewSettings(reader="demo"))
        with _serving(app) as url:
            shoot(url, "review", "body[data-state=ready]")
    print(f"{len(pages) + 2} pages in {out}")


# ------------------------------------------------------------------------------------------------ compare


def pixel_diff(a: Path, b: Path) -> tuple[float, str]:
    """Share of differing pixels over the larger canvas (white where a screenshot is smaller), and the sizes."""
    import cv2
    import numpy as np

    x, y = cv2.imread(str(a)), cv2.imread(str(b))
    h, w = max(x.shape[0], y.shape[0]), max(x.shape[1], y.shape[1])

    def pad(img: np.ndarray) -> np.ndarray:
        canvas = np.full((h, w, 3), 255, np.uint8)
        canvas[: img.shape[0], : img.shape[1]] = img
        return canvas

    diff = (pad(x) != pad(y)).any(axis=2)
    return float(diff.mean()), f"{x.shape[1]}x{x.shape[0]} / {y.shape[1]}x{y.shape[0]}"


def compare_dirs(before: Path, after: Path, show: Callable[[str], None] = print) -> list[dict[str, object]]:
    import difflib

    rows = []
    names = sorted({p.stem for p in before.glob("*.png")} | {p.stem for p in after.glob("*.png")})
    show(f"{'page':<10} {'text identical':<15} {'pixels differing':>16}  sizes (before / after)")
    for n in names:
        pa, pb = before / f"{n}.png", after / f"{n}.png"
        if not (pa.is_file() and pb.is_file()):
            show(f"{n:<10} missing in {'before' if not pa.is_file() else 'after'}")
            continue
        ta, tb = (before / f"{n}.txt").read_text(), (after / f"{n}.txt").read_text()
        share, sizes = pixel_diff(pa, pb)
        same = ta == tb
        show(f"{n:<10} {'yes' if same else 'NO':<15} {share:>15.3%}  {sizes}")
        if not same:
            for line in list(difflib.unified_diff(ta.splitlines(), tb.splitlines(), lineterm="", n=0))[2:8]:
                show(f"{'':<10} {line[:150]}")
        rows.append({"page": n, "text_identical": same, "pixel_diff": share, "sizes": sizes})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="build every page from the demo and photograph it")
    r.add_argument("--work", type=Path, required=True, help="the demo's folder (made once, pages rebuilt in it)")
    r.add_argument("--out", type=Path, required=True, help="where HTML, text and screenshots go")
    c = sub.add_parser("compare", help="text equality and pixel difference of two renderings")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "render":
        render(args.work, args.out)
    else:
        compare_dirs(args.before, args.after)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
