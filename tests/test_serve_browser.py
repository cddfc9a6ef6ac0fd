"""The web page in a real browser: uvicorn serving the app on loopback, headless Chromium (Debian's, driven by
Playwright) uploads a real X-ray and must show a label, probability bars and the Grad-CAM overlay, with no
request leaving the server's origin and no console (e.g. Content-Security-Policy) error. The screenshot is
kept as a test artifact (``$CXRLAB_TEST_ARTIFACTS`` or the test's temp dir; its path is printed)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from cxrlab import RESEARCH_NOTICE

pytestmark = pytest.mark.browser

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_bundle: Path):
    """uvicorn serving ``create_app`` on a free loopback port, in a thread of this process (the model and its
    imports are already loaded here; ``cxrlab serve`` itself is tested in test_serve.py); yields the base URL."""
    import httpx
    import uvicorn

    from cxrlab.serve import ServeSettings, create_app

    port = _free_port()
    app = create_app(tiny_bundle, ServeSettings(port=port, device="cpu"))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="test-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not srv.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail("uvicorn did not start")
            time.sleep(0.05)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        yield url
    finally:
        srv.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    d = Path(os.environ.get("CXRLAB_TEST_ARTIFACTS", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_page_shows_label_bars_and_heatmap(server: str, browser, cxr_tiny: Path, artifacts: Path, tmp_path) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    requests: list[str] = []
    problems: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    page.goto(server + "/")
    # selectors, not wait_for_function: the page's CSP forbids the eval() that wait_for_function needs
    page.wait_for_selector("#model:has-text('test_efficientnet')")
    xray = sorted((cxr_tiny / "PNEUMONIA").glob("*.jpg"))[0]
    page.set_input_files("#file", str(xray))
    page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=60_000)
    assert page.eval_on_selector("body", "b => b.dataset.state") == "done", page.inner_text("#error")
    deadline = time.monotonic() + 10
    while not page.eval_on_selector("#heatmap", "img => img.complete") and time.monotonic() < deadline:
        time.sleep(0.1)

    shot = artifacts / "serve_page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    assert page.inner_text("#label").strip() in CLASSES
    assert page.locator("#bars .bar").count() == len(CLASSES)
    assert page.eval_on_selector("#heatmap", "img => img.naturalWidth") > 0
    assert page.is_visible("#heatmap")
    assert RESEARCH_NOTICE in page.inner_text("#notice") and RESEARCH_NOTICE in page.inner_text("#meta")
    # fully offline: every request went to this server (or stayed in the page as data:/blob:)
    assert all(u.startswith((server, "data:", "blob:")) for u in requests), requests
    assert not problems, problems

    # a non-image is refused with the server's message, shown on the page
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n" * 10)
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("body[data-state=error]", timeout=30_000)
    assert page.inner_text("#error").startswith("415")
    page.close()
