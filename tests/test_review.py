"""Radiologist review (``cxrlab review``): the queue order, the answers database (one answer per reader and image,
two readers both kept), export -> import round trip, the relabel manifest that ``data split`` accepts, the
agreement numbers, the token, the CLI, and a scripted reader in headless Chromium who answers 10 images with the
keyboard, reloads midway, and leaves exactly 10 answers in the database."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxrlab.review.core import (
    ExportConfig,
    ReviewConfig,
    agreement,
    box_mask,
    export_review,
    import_answers,
    load_queue,
    stratified_order,
    wilson_ci,
)
from cxrlab.review.store import Answer, ReviewError, ReviewStore, export_csv


@pytest.fixture(scope="module")
def explained_run(tiny_bundle: Path, phantom_split: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory (the tiny untrained bundle, trained 'on' phantom_split) explained on its val + test splits."""
    from cxrlab.analysis.explain import ExplainConfig, explain

    run = tmp_path_factory.mktemp("runs") / "run-review"
    shutil.copytree(tiny_bundle, run / "bundle")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": str(phantom_split)}))
    (run / "summary.json").write_text(json.dumps({"run_id": "run-review", "data": str(phantom_split)}))
    for split in ("test", "val"):
        explain(ExplainConfig(target=run, split=split, wandb="off", progress=False, device="cpu"))
    return run


def _fresh_db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / f'review-{uuid.uuid4().hex[:6]}.db'}"


def _client(run: Path, db: str, token: str | None = None, sample: int = 40):
    from fastapi.testclient import TestClient

    from cxrlab.review.app import ReviewSettings, create_review_app

    q = load_queue(ReviewConfig(run=run, db=db, sample=sample))
    store = ReviewStore(q.db_url)
    return TestClient(create_review_app(q, store, ReviewSettings(token=token, reader="dr-a"))), q, store


# ------------------------------------------------------------------------------------------------ queue


def test_queue_errors_first_by_confidence_then_stratified_sample(explained_run: Path) -> None:
    table = pd.read_csv(explained_run / "explain-test" / "attention.csv")
    q = load_queue(ReviewConfig(run=explained_run, sample=6))
    n_err = int((~table["correct"]).sum())
    assert q.n_errors == n_err and q.n_explained == len(table)
    errs, rest = q.items[:n_err], q.items[n_err:]
    assert all(not it.correct for it in errs) and all(it.correct for it in rest)
    conf = [it.confidence for it in errs]
    assert conf == sorted(conf, reverse=True)
    assert len(rest) == min(6, len(table) - n_err)
    assert len({it.image for it in q.items}) == len(q.items)  # no image twice
    assert all(it.thumb.is_file() and it.overlay.is_file() for it in q.items)


def test_stratified_order_round_robin() -> None:
    labels = ["A"] * 10 + ["B"] * 3 + ["C"] * 5
    got = stratified_order(labels, 9, seed=0)
    assert len(got) == len(set(got)) == 9
    counts = pd.Series([labels[i] for i in got]).value_counts().to_dict()
    assert counts == {"A": 3, "B": 3, "C": 3}
    assert stratified_order(labels, 100, seed=0).__len__() == len(labels)
    assert stratified_order(labels, 9, seed=0) == got  # seeded


def test_missing_explain_output_names_the_path_and_the_fix(tmp_path: Path, tiny_bundle: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_bundle, run / "bundle")
    (run / "summary.json").write_text("{}")
    with pytest.raises(ReviewError, match=r"explain-test.attention\.csv.*cxrlab explain"):
        load_queue(ReviewConfig(run=run))
    with pytest.raises(ReviewError, match="run not found"):
        load_queue(ReviewConfig(run=tmp_path / "nope"))


# ------------------------------------------------------------------------------------------------ store + API


def test_two_readers_on_one_image_both_kept_and_a_rewrite_replaces(explained_run: Path, tmp_path: Path) -> None:
    db = _fresh_db(tmp_path)
    client, q, store = _client(explained_run, db)
    with client:
        a = {"reader": "dr-a", "label_ok": True, "localisation": "yes", "region": [[0.1, 0.2, 0.3, 0.4]], "note": "ok"}
        b = {"reader": "dr-b", "label_ok": False, "corrected_label": "NORMAL", "localisation": "no"}
        assert client.put("/api/answers/0", json=a).status_code == 200
        r = client.put("/api/answers/0", json=b)
        assert r.status_code == 200 and r.json()["progress"]["readers"] == ["dr-a", "dr-b"]
        rows = store.answers(q.run_id)
        assert [(x["reader"], x["image"]) for x in rows] == [("dr-a", q.items[0].image), ("dr-b", q.items[0].image)]
        # the same reader again (a reload, a second pass): replaced, not duplicated
        assert client.put("/api/answers/0", json={**a, "localisation": "partly"}).status_code == 200
        rows = store.answers(q.run_id)
        assert len(rows) == 2 and rows[0]["localisation"] == "partly" and rows[0]["region"] == [[0.1, 0.2, 0.3, 0.4]]
        assert rows[1]["corrected_label"] == "NORMAL" and rows[1]["label_ok"] is False
        assert rows[0]["run_id"] == "run-review" and rows[0]["prediction"] == q.items[0].prediction
        # items show each reader only their own answer; progress per reader
        items = client.get("/api/items", params={"reader": "dr-b"}).json()
        assert items["items"][0]["answer"]["localisation"] == "no" and items["progress"]["answered"] == 1
        assert client.get("/api/items", params={"reader": "dr-c"}).json()["items"][0]["answer"] is None
        # bad input: a clear 4xx
        assert client.put("/api/answers/0", json={**b, "corrected_label": "CAT"}).status_code == 422
        assert client.put("/api/answers/0", json={**a, "localisation": "maybe"}).status_code == 422
        assert client.put("/api/answers/0", json={**a, "region": [[0, 0, 2, 1]]}).status_code == 422
        assert client.put("/api/answers/0", json={**a, "reader": "  "}).status_code == 422
        missing = client.put(f"/api/answers/{len(q.items)}", json=a)
        assert missing.status_code == 404 and "no item" in missing.json()["detail"]
        assert client.get("/api/image/0/image").headers["content-type"] == "image/jpeg"
        assert client.get("/api/image/0/overlay").status_code == 200
        assert client.get("/api/image/0/original").headers["content-type"] == "image/png"
    store.close()


def test_token_is_required_on_the_api_but_not_on_the_page(explained_run: Path, tmp_path: Path) -> None:
    client, _, store = _client(explained_run, _fresh_db(tmp_path), token="s3cret")
    with client:
        assert client.get("/").status_code == 200
        assert client.get("/api/info").json()["auth_required"] is True
        assert client.get("/api/items").status_code == 401
        assert client.get("/api/image/0/image", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = client.get("/api/items", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["items"]
        assert client.put("/api/answers/0", json={"reader": "x", "localisation": "yes"}).status_code == 401
    store.close()


def _fill(store: ReviewStore, q, answers: list[tuple[int, str, dict]]) -> None:
    for i, reader, extra in answers:
        store.save(q.info(i), Answer(reader=reader, **extra))


def test_export_round_trips_through_import(explained_run: Path, tmp_path: Path) -> None:
    db = _fresh_db(tmp_path)
    q = load_queue(ReviewConfig(run=explained_run, db=db))
    store = ReviewStore(q.db_url)
    _fill(
        store,
        q,
        [
            (0, "dr-a", {"label_ok": True, "localisation": "yes", "note": 'comma, "quote"\nnewline'}),
            (0, "dr-b", {"label_ok": False, "corrected_label": "PNEUMONIA", "localisation": "partly"}),
            (1, "dr-a", {"label_ok": None, "localisation": "no", "region": [[0.5, 0.5, 0.7, 0.9], [0, 0, 0.1, 0.1]]}),
        ],
    )
    first = export_csv(store.answers(), tmp_path / "a.csv")
    store.close()
    db2 = _fresh_db(tmp_path)
    assert import_answers(first, db2).n_rows == 3
    s2 = ReviewStore(db2)
    second = export_csv(s2.answers(), tmp_path / "b.csv")
    assert first.read_bytes() == second.read_bytes()
    assert s2.answers() == ReviewStore(db).answers()
    s2.close()
    # importing the same file again changes nothing (one answer per run, image and reader)
    import_answers(first, db2)
    assert ReviewStore(db2).count() == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("image,reader\nx,y\n")
    with pytest.raises(ReviewError, match=r"bad\.csv lacks the column.*cxrlab review --export"):
        import_answers(bad, db2)


def test_export_agreement_and_relabel_manifest_accepted_by_split(explained_run: Path, tmp_path: Path) -> None:
    from cxrlab.data.split import SplitConfig, split

    db = _fresh_db(tmp_path)
    q = load_queue(ReviewConfig(run=explained_run, db=db))
    store = ReviewStore(q.db_url)
    img0 = q.items[0]
    new = next(c for c in q.classes if c != img0.label)
    _fill(
        store,
        q,
        [
            (0, "dr-a", {"label_ok": False, "corrected_label": new, "localisation": "yes"}),
            (0, "dr-b", {"label_ok": False, "corrected_label": new, "localisation": "partly"}),
            (1, "dr-a", {"label_ok": True, "localisation": "no", "region": [[0.0, 0.0, 1.0, 1.0]]}),
            (2, "dr-a", {"label_ok": True, "localisation": "yes", "region": [[0.0, 0.0, 0.5, 1.0]]}),
        ],
    )
    store.close()
    res = export_review(ExportConfig(run=explained_run, db=db, out=tmp_path / "export"))
    a = res.agreement["run-review"]
    assert (a["answers"], a["images"], a["yes"], a["partly"], a["no"]) == (4, 3, 2, 1, 1)
    assert a["share_yes"] == pytest.approx(0.5) and a["share_yes_ci"] == pytest.approx(list(wilson_ci(2, 4)))
    assert a["readers"] == ["dr-a", "dr-b"] and a["label_wrong"] == 2
    # the whole image holds all the CAM mass; the left half some share of it
    assert a["cam_in_region"]["n"] == 2 and 0.5 <= a["cam_in_region"]["mean"] <= 1.0
    doc = json.loads(res.agreement_json.read_text())
    assert doc["runs"]["run-review"]["yes"] == 2
    assert len(pd.read_csv(res.answers_csv)) == 4
    # two readers agree on the new class: relabelled; data split accepts the manifest
    assert res.n_relabelled == 1 and res.relabel_manifest is not None
    changes = pd.read_csv(res.relabel_csv)
    assert changes.to_dict("records") == [
        {"path": img0.image, "old_label": img0.label, "new_label": new, "readers": "dr-a;dr-b"}
    ]
    s = split(SplitConfig(manifest=res.relabel_manifest.parent, out=tmp_path / "resplit", progress=False))
    table = pd.read_csv(s.split_path)
    assert table.loc[table["path"] == img0.image, "label"].item() == new
    from cxrlab.data.manifest import load_split

    assert len(table) == len(load_split(yaml.safe_load((explained_run / "config.yaml").read_text())["data"]).table)


def test_wilson_and_box_mask() -> None:
    lo, hi = wilson_ci(8, 10)
    assert 0.49 < lo < 0.5 and 0.94 < hi < 0.95  # the textbook 95% interval for 8/10: 0.490-0.943
    assert all(map(lambda v: v != v, wilson_ci(0, 0)))
    m = box_mask([[0.0, 0.0, 0.5, 0.5]], (10, 10))
    assert m.sum() == 25 and m[:5, :5].all()
    assert box_mask([[0.95, 0.95, 0.96, 0.96]], (10, 10)).sum() == 1  # a point still covers one pixel
    rows = [
        {"run_id": "r", "image": "i", "reader": "a", "localisation": "yes", "label_ok": True},
        {"run_id": "r", "image": "i", "reader": "b", "localisation": None, "label_ok": None},
    ]
    a = agreement(rows)["r"]
    assert a["localisation_answers"] == 1 and a["share_yes"] == 1.0 and a["answers"] == 2


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_help_export_and_import(explained_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from cxrlab.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["review", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--export" in out and "--db" in out and "--token" in out and "errors first" in out
    db = tmp_path / "cli.db"
    q = load_queue(ReviewConfig(run=explained_run, db=str(db)))
    store = ReviewStore(q.db_url)
    _fill(store, q, [(0, "dr-a", {"label_ok": True, "localisation": "yes"})])
    store.close()
    assert main(["review", str(explained_run), "--db", str(db), "--export", "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "yes 100%" in out and "answers.csv" in out
    db2 = tmp_path / "cli2.db"
    args = ["review", str(explained_run), "--db", str(db2), "--import", str(tmp_path / "x" / "answers.csv")]
    assert main(args) == 0
    assert ReviewStore(f"sqlite:///{db2}").count() == 1
    assert main(["review", str(tmp_path / "missing-run")]) == 2
    assert "run not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ PostgreSQL


def test_two_readers_on_postgres(explained_run: Path) -> None:
    url = os.environ.get("CXRLAB_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("CXRLAB_TEST_POSTGRES_URL is not set (.ci/run sets it after starting PostgreSQL)")
    pytest.importorskip("psycopg2", reason="psycopg2 (the PostgreSQL driver) is not installed")
    from cxrlab.review.store import normalise_url

    q = load_queue(ReviewConfig(run=explained_run, db=url))
    assert q.db_url == normalise_url(url)
    store = ReviewStore(q.db_url)
    run_id = f"pg-{uuid.uuid4().hex[:8]}"  # the database outlives the test: a fresh run id
    q.run_id = run_id
    try:
        _fill(store, q, [(0, "dr-a", {"localisation": "yes"}), (0, "dr-b", {"localisation": "no"})])
        _fill(store, q, [(0, "dr-a", {"localisation": "partly"})])
        rows = store.answers(run_id)
        assert [(r["reader"], r["localisation"]) for r in rows] == [("dr-a", "partly"), ("dr-b", "no")]
    finally:
        import sqlalchemy as sa

        with store.engine.begin() as con:
            con.execute(sa.delete(store.table).where(store.table.c.run_id == run_id))
        store.close()


# ------------------------------------------------------------------------------------------------ browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
def test_scripted_reader_answers_10_images_with_the_keyboard_and_reloads_midway(
    explained_run: Path, browser, tmp_path: Path
) -> None:
    import uvicorn

    from cxrlab.review.app import ReviewSettings, create_review_app

    db = _fresh_db(tmp_path)
    q = load_queue(ReviewConfig(run=explained_run, split="val", db=db, sample=40))
    assert len(q.items) >= 12, len(q.items)
    store = ReviewStore(q.db_url)
    port = _free_port()
    app = create_review_app(q, store, ReviewSettings(port=port, reader="dr-kbd"))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="test-review-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/"
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    try:
        deadline = time.monotonic() + 60
        while not srv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        page.goto(url)
        page.wait_for_selector("body[data-state=ready][data-index='0']")
        assert page.input_value("#reader") == "dr-kbd"
        keys_by_item = ["a y", "x 2 n", "a p", "a y", "x 1 p", "a n", "a y", "x 3 y", "a p", "a n"]
        for n, keys in enumerate(keys_by_item):
            if n == 5:  # reload midway: the page resumes at the first unanswered image
                page.reload()
                page.wait_for_selector("body[data-state=ready][data-answered='5'][data-index='5']")
                assert page.inner_text("#progress").startswith("5 / ")
            page.wait_for_selector(f"body[data-state=ready][data-index='{n}']")
            if n == 3:  # a drawn region and a note on one image
                box = page.locator("#stage").bounding_box()
                page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + 0.3 * box["height"])
                page.mouse.down()
                page.mouse.move(box["x"] + 0.6 * box["width"], box["y"] + 0.7 * box["height"], steps=4)
                page.mouse.up()
                assert page.locator("#stage .box").count() == 1
                page.keyboard.press("e")
                page.keyboard.type("consolidation right lower lobe")
                page.keyboard.press("Escape")
            if n == 6:  # overlay toggle and opacity keys work on the page
                page.keyboard.press("o")
                assert page.is_hidden("#overlay")
                page.keyboard.press("o")
                page.keyboard.press("[")
                assert page.input_value("#opacity") == "50"
            for k in keys.split():
                page.keyboard.press(k)
            page.keyboard.press("Enter")
            page.wait_for_selector(f"body[data-state=ready][data-answered='{n + 1}']")
        assert page.inner_text("#progress").startswith("10 / ")
        # Enter with a question unanswered saves nothing and says why
        page.keyboard.press("y")
        page.keyboard.press("Enter")
        page.wait_for_selector("body[data-state=error]")
        assert "answer both questions" in page.inner_text("#error")
        rows = store.answers(q.run_id)
        assert len(rows) == 10, [r["image"] for r in rows]
        assert {r["reader"] for r in rows} == {"dr-kbd"}
        assert {r["image"] for r in rows} == {it.image for it in q.items[:10]}
        by = {r["image"]: r for r in rows}
        r1, r3, r4 = (by[q.items[i].image] for i in (1, 3, 4))
        assert r1["label_ok"] is False and r1["corrected_label"] == q.classes[1] and r1["localisation"] == "no"
        assert r4["corrected_label"] == q.classes[0] and r4["localisation"] == "partly"
        assert r3["note"] == "consolidation right lower lobe" and len(r3["region"]) == 1
        x0, y0, x1, y1 = r3["region"][0]
        assert x0 == pytest.approx(0.2, abs=0.02) and y1 == pytest.approx(0.7, abs=0.02)
        assert [by[it.image]["localisation"] for it in q.items[:10]] == [
            {"y": "yes", "p": "partly", "n": "no"}[k.split()[-1]] for k in keys_by_item
        ]
        assert all(u.startswith((url.rstrip("/"), "data:", "blob:")) for u in requests), requests
        assert not problems, problems
    finally:
        page.close()
        srv.should_exit = True
        thread.join(timeout=20)
        store.close()


def test_run_report_and_compare_show_the_reviewed_agreement(explained_run: Path, tmp_path: Path) -> None:
    from cxrlab.analysis.compare import _read_attention
    from cxrlab.report.pages import write_run_report
    from cxrlab.review.core import read_agreement

    db = _fresh_db(tmp_path)
    q = load_queue(ReviewConfig(run=explained_run, db=db))
    store = ReviewStore(q.db_url)
    _fill(store, q, [(0, "dr-a", {"localisation": "yes"}), (1, "dr-a", {"localisation": "no"})])
    store.close()
    export_review(ExportConfig(run=explained_run, db=db, cam_overlap=False))  # default out: <run>/review
    a = read_agreement(explained_run)
    assert a is not None and a["review_yes"] == 0.5 and a["review_n"] == 2
    assert (a["review_yes_ci_low"], a["review_yes_ci_high"]) == pytest.approx(wilson_ci(1, 2))
    att = _read_attention(explained_run, "test")
    assert att is not None and att["review_yes"] == 0.5 and "in_lungs" in att  # what compare tabulates per model
    page = write_run_report(explained_run, out=tmp_path / "report.html").read_text()
    assert "Radiologist review of the Grad-CAM regions" in page
    assert read_agreement(tmp_path) is None


@pytest.mark.browser
def test_page_with_a_token_asks_for_it_and_then_works(explained_run: Path, browser, tmp_path: Path) -> None:
    import uvicorn

    from cxrlab.review.app import ReviewSettings, create_review_app

    q = load_queue(ReviewConfig(run=explained_run, db=_fresh_db(tmp_path)))
    store = ReviewStore(q.db_url)
    port = _free_port()
    app = create_review_app(q, store, ReviewSettings(port=port, token="tok-42", reader="dr-t"))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="test-review-token", daemon=True)
    thread.start()
    page = browser.new_page()
    try:
        deadline = time.monotonic() + 60
        while not srv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("body[data-state=auth]")
        assert page.is_visible("#token")
        page.fill("#token", "tok-42")
        page.press("#token", "Enter")
        page.dispatch_event("#token", "change")
        page.wait_for_selector("body[data-state=ready][data-index='0']")
        page.click("body")
        for k in ("a", "y", "Enter"):
            page.keyboard.press(k)
        page.wait_for_selector("body[data-answered='1']")
        assert store.count(q.run_id) == 1
    finally:
        page.close()
        srv.should_exit = True
        thread.join(timeout=20)
        store.close()
