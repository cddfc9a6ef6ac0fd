"""Every page comes from a Jinja2 template that escapes what the data says: a class named like a script tag and
a file named like an image with an ``onerror`` handler show up as text on every page, never as markup (and in
Chromium no dialog opens). Pages are built here from hand-written stage files, so nothing trains."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cxrlab.report import html as rh

CLASS = "<script>alert(1)</script>"  # a class (folder) name: a '/' is fine in a JSON document
NAME = "<img src=x onerror=alert(2)>"  # a file or folder name (no '/')
HOSTILE = (CLASS, NAME)


def _png(path: Path, seed: int = 0) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    img = (np.random.default_rng(seed).random((48, 48)) * 255).astype(np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def assert_escaped(html: str, *texts: str) -> None:
    """Each text is in the page only in its escaped form (and is there)."""
    for t in texts:
        assert t not in html, f"{t!r} reached the page unescaped"
        esc = t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert esc in html, f"{esc!r} is not on the page"


# ------------------------------------------------------------------------------------------------ page makers


def _eval_dir(base: Path) -> Path:
    """An evaluation folder as ``cxrlab evaluate`` writes it, whose class, source and files are hostile names."""
    d = base / "eval-test"
    d.mkdir(parents=True)
    wrong = _png(base / "images" / f"{NAME}.png")
    pd.DataFrame(
        [{"path": str(wrong), "label": CLASS, "prediction": "NORMAL", "confidence": 0.9, "correct": False}]
    ).to_csv(d / "predictions.csv", index=False)
    _png(d / "confusion_matrix.png", 1)
    row = {"precision": 0.5, "precision_lo": 0.2, "precision_hi": 0.8, "recall": 0.4, "f1": 0.45, "auc": 0.6}
    doc = {
        "prefix": "test",
        "classes": [CLASS, "NORMAL"],
        "present_classes": [CLASS, "NORMAL"],
        "metrics": {"test/accuracy": 0.5, f"test/recall_{CLASS}": 0.4, "test/f1_macro": 0.45},
        "ci": {"test/accuracy": [0.3, 0.7]},
        "per_class": [{"class": CLASS, "support": 3, "predicted": 2, "fn": 1, "fp": 0, **row}],
        "per_source": [
            {"source": NAME, "n": 3, "accuracy": 0.5, f"n_{CLASS}": 3, f"recall_{CLASS}": 0.4, f"predicted_{CLASS}": 2}
        ],  # fmt: skip
        "shift": {"note": CLASS, "ood": {"n_flagged": 1, "n": 3, "reasons": {NAME: 1}}},
        "warnings": [f"label shift towards {CLASS}"],
        "skipped": [{"path": str(base / f"{NAME}.dcm"), "reason": "unreadable"}],
        "n_skipped": 1,
        "n": 3,
        "data": str(base / NAME),
        "bundle": str(base / NAME / "bundle"),
        "files": {"predictions": str(d / "predictions.csv")},
    }
    (d / "metrics.json").write_text(json.dumps(doc))
    return d


def eval_page(tmp: Path) -> str:
    from cxrlab.report.pages import write_eval_report

    return write_eval_report(_eval_dir(tmp / "run")).read_text()


def run_page(tmp: Path) -> str:
    from cxrlab.report.pages import write_run_report

    run = tmp / "runs" / NAME
    _eval_dir(run)
    (run / "summary.json").write_text(json.dumps({"run_id": CLASS, "data": NAME, "best_epoch": 1}))
    (run / "config.yaml").write_text(json.dumps({"model_name": CLASS}))
    ex = run / f"explain-{NAME}"
    ex.mkdir()
    (ex / "explain.html").write_text("<html></html>")
    (ex / "attention.json").write_text(json.dumps({"subset": CLASS, "summary": {"in_lungs": 0.6, "n_images": 3}}))
    audit = tmp / "audit"
    audit.mkdir()
    doc = {"warnings": [f"{CLASS} comes from one source"], "text_share": {CLASS: 0.4},
           "confound": {"chance_balanced_accuracy": 0.5, "groups": {NAME: {"balanced_accuracy": 0.9}}}}  # fmt: skip
    (audit / "audit.json").write_text(json.dumps(doc))
    return write_run_report(run).read_text()


def compare_page(tmp: Path) -> str:
    from cxrlab.report.compare_page import write_compare_report

    def side(name: str) -> SimpleNamespace:
        return SimpleNamespace(prefix="test", run_dir=tmp / name, bundle_dir=None, data_source=NAME,
                               classes=[CLASS, "NORMAL"], metrics={f"test/recall_{CLASS}": 0.5}, ci={},
                               costly_class=CLASS)  # fmt: skip

    r = SimpleNamespace(
        baseline=side(NAME),
        challenger=side("b"),
        n=3,
        verdict=f"no significant difference on {CLASS}",
        significant=False,
        mcnemar=SimpleNamespace(b=1, c=2, p_exact=0.5, p_midp=0.4, p_chi2=0.6),
        both_right=1,
        both_wrong=0,
        accuracy_diff=0.1,
        accuracy_diff_ci=(-0.1, 0.3),
        f1_diff=0.0,
        f1_diff_ci=(float("nan"), float("nan")),
        errors=pd.DataFrame([{"class": CLASS, "fn_baseline": 1, "fn_challenger": 0}]),
        out_dir=tmp,
        attention=pd.DataFrame([{"model": NAME, "in lungs": 0.5}]),
    )
    return write_compare_report(r, tmp / "compare.html").read_text()  # type: ignore[arg-type]


def audit_page(tmp: Path) -> str:
    """The real audit of phantoms whose first class folder and first file have hostile names."""
    from cxrlab.data.audit import AuditConfig, audit
    from cxrlab.data.ingest import IngestConfig, ingest
    from cxrlab.data.synth import SynthConfig, generate

    src = tmp / "src"
    generate(SynthConfig(out=src, n_per_class=8, size=48, seed=3, classes=("COVID19", "NORMAL")))
    hostile = src / "COVID19"
    first = sorted(hostile.iterdir())[0]
    first.rename(hostile / f"{NAME}.png")
    hostile.rename(src / NAME)
    ingest(IngestConfig(src=src, out=tmp / "manifest", workers=0, progress=False))
    res = audit(AuditConfig(data=tmp / "manifest", out=tmp / "audit", workers=0, progress=False, blur_threshold=1e9))
    assert NAME in res.classes
    return res.html_path.read_text()


def explain_page(tmp: Path) -> str:
    from cxrlab.report.explain_page import write_explain_page

    classes = [CLASS, "NORMAL"]
    row = {"index": 0, "label": CLASS, "prediction": "NORMAL", "correct": False, "confidence": 0.7,
           f"p_{CLASS}": 0.3, "p_NORMAL": 0.7, "in_lungs": 0.5, "on_text": float("nan"), "on_border": 0.1,
           "image": f"images/{NAME}.png", "overlay": f"overlays/{NAME}.png", "path": f"/data/{NAME}.png"}  # fmt: skip
    stats = {"n_images": 1, "accuracy": 0.0, "in_lungs": 0.5}
    doc = {"model": {"name": CLASS, "run_id": NAME, "bundle": NAME, "preprocess": {"mean": CLASS}},
           "regions": {"border_frac": 0.08}, "data": NAME, "subset": "all", "n_seen": 1, "skipped": [],
           "method": "gradcam", "cam_target": CLASS, "target_layer": NAME, "split": "test", "summary": stats,
           "per_class": {CLASS: stats}, "by_outcome": {"wrong": stats}}  # fmt: skip
    write_explain_page(tmp / "explain.html", pd.DataFrame([row]), doc, classes)
    return (tmp / "explain.html").read_text()


def mine_page(tmp: Path) -> str:
    from cxrlab.report.mine_page import write_mine_page

    q = str(_png(tmp / "q" / f"{NAME}.png"))
    n = str(_png(tmp / "pool" / f"{NAME}-2.png", 1))
    table = pd.DataFrame([{"query": q, "rank": 1, "path": n, "distance": 0.1}])
    rows_q = [{"query": q, "label": CLASS, "prediction": "NORMAL", "confidence": 0.8}]
    write_mine_page(tmp / "gallery.html", rows_q, table, base=tmp / NAME, pool=tmp / "pool", k=1, images=None,
                    thumb=64)  # fmt: skip
    return (tmp / "gallery.html").read_text()


def validate_page(tmp: Path) -> str:
    from cxrlab.analysis.validate import ValidateResult, write_validate_page

    rows = pd.DataFrame([{"fold": NAME, "test_n": 3, "test_accuracy": 0.5, "external_n": 2,
                          f"external_recall_{CLASS}": 0.5}])  # fmt: skip
    folds = [{"fold": NAME, "status": "skipped", "reason": f"no image of class {CLASS}"},
             {"fold": "b", "status": "done", "warnings": {"external": [f"collapse onto {CLASS}"]}}]  # fmt: skip
    res = ValidateResult(out=tmp / NAME, rows=rows, classes=[CLASS], folds=folds)
    return write_validate_page(res, tmp / "validate.html").read_text()


def sweep_page(tmp: Path) -> str:
    import plotly.graph_objects as go

    from cxrlab.sweep.importance import page

    return page(go.Figure(), None, f"not computed: {CLASS}", f"sweep {NAME}")


PAGES = {
    "eval": eval_page,
    "run": run_page,
    "compare": compare_page,
    "audit": audit_page,
    "explain": explain_page,
    "mine": mine_page,
    "validate": validate_page,
    "sweep": sweep_page,
}
# what each page shows of the data (the audit's classes are folder names, so it has no '/' in them)
SHOWS = {"audit": (NAME,), "mine": (CLASS, NAME), "sweep": (CLASS, NAME)}


@pytest.mark.parametrize("name", list(PAGES))
def test_names_from_the_data_are_escaped(name: str, tmp_path: Path) -> None:
    html = PAGES[name](tmp_path)
    assert_escaped(html, *SHOWS.get(name, HOSTILE))
    # the page's own markup is intact: it ends where it should and holds no handler from the data
    assert html.rstrip().endswith("</html>") and "onerror=alert" not in html.replace("onerror=alert(2)&gt;", "")


def test_sweep_page_without_importances_is_our_template_without_the_panel() -> None:
    """The W&B backend computes no importances: its page is the same template, minus the importance panel (it
    used to be plotly's own page, outside the templates)."""
    import plotly.graph_objects as go

    from cxrlab.sweep.importance import page

    bare = page(go.Figure(), None, None, f"sweep {NAME}")
    assert "id='importance'" not in bare and bare.rstrip().endswith("</html>")
    assert_escaped(bare, NAME)
    assert "id='importance'" in page(go.Figure(), None, "not computed", "t")


@pytest.mark.browser
@pytest.mark.parametrize("name", ["eval", "run", "explain", "mine", "validate", "audit"])
def test_hostile_names_show_as_text_in_chromium(name: str, browser, tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_text(PAGES[name](tmp_path))
    dialogs: list[str] = []
    page = browser.new_page()
    try:
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(path.as_uri(), wait_until="load")
        text = page.evaluate("document.body.innerText")
    finally:
        page.close()
    assert dialogs == []
    assert NAME in text and (name == "audit" or CLASS in text)


def test_served_pages_escape_what_they_are_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prediction and review pages are templates too: their one variable (the notice) is escaped."""
    import cxrlab
    from cxrlab.serve.http import static_page

    monkeypatch.setattr(cxrlab, "RESEARCH_NOTICE", CLASS)
    for package, resource in (("cxrlab.serve", "static/index.html"), ("cxrlab.review", "static/review.html")):
        html, csp = static_page(package, resource)
        assert_escaped(html, CLASS)
        assert "script-src 'sha256-" in csp and "http" not in csp


def test_eval_page_keeps_its_number_formats(tmp_path: Path) -> None:
    """Values with 3 decimals, per-class intervals with 2, headline intervals with 3, counts with separators."""
    html = eval_page(tmp_path)
    assert "<td>0.500 [0.20, 0.80]</td>" in html and "95% CI [0.300, 0.700]" in html
    assert '<td class="num">3</td>' in html and "<div class='v'>–</div>" in html  # no ROC AUC: a dash


# ------------------------------------------------------------------------------------------------ the layer


def test_every_page_is_a_template_and_python_builds_no_markup() -> None:
    """The page modules hold no HTML tags: markup lives in templates/ only."""
    src = Path(rh.__file__).resolve().parents[1]
    builders = [*sorted((src / "report").glob("*.py")), src / "analysis" / "validate.py"]
    builders.append(src / "sweep" / "importance.py")
    tags = "div|p|table|tr|td|th|section|h[1-6]|span|img|figure|a|html|style|script"
    tag = re.compile(rf"""["'][^"'\n]*<(?:{tags})[\s>]""")
    offenders = [f"{p.name}: {m.group(0)}" for p in builders for m in tag.finditer(p.read_text())]
    assert offenders == []


def test_table_formats_numbers_and_cuts_long_tables() -> None:
    t = rh.table([[1234, 0.123456, float("nan"), True, "x"]] * 3, columns=list("abcde"), max_rows=2)
    assert t.more == 1 and len(t.rows) == 2
    assert [c.text for c in t.rows[0]] == ["1,234", "0.123", "", "yes", "x"]
    assert [c.num for c in t.rows[0]] == [True, True, True, False, False]
    html = rh.render("validate.html", title="t", subtitle=None, table=t, skipped=[], shift_warnings=[])
    assert '<td class="num">1,234</td>' in html and "1 more rows not shown" in html


def test_a_missing_context_key_fails_the_page() -> None:
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        rh.render("validate.html", title="t", table=rh.table([[1]], columns=["a"]))
