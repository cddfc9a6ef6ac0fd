"""Service contracts through FastAPI's TestClient: a real X-ray and a real DICOM -> 200 with the model, dataset
version, notice and a Grad-CAM PNG; every bad input -> its own 4xx with a JSON message; the server keeps serving."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlab import RESEARCH_NOTICE

fastapi_testclient = pytest.importorskip("fastapi.testclient")

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def client(tiny_bundle: Path):
    from cxrlab.serve import ServeSettings, create_app

    settings = ServeSettings(token=TOKEN, max_upload_mb=1.0, max_pixels=1_000_000, device="cpu", max_batch=4)
    with fastapi_testclient.TestClient(create_app(tiny_bundle, settings)) as c:
        yield c


@pytest.fixture(scope="module")
def xray(cxr_tiny: Path) -> tuple[str, bytes]:
    p = sorted((cxr_tiny / "COVID19").glob("*.jpg"))[0]
    return p.name, p.read_bytes()


def _png(shape: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _ok(client, name: str, data: bytes, **params) -> dict:
    r = client.post("/predict", files={"file": (name, data, "application/octet-stream")}, headers=AUTH, params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] in CLASSES and list(body["probabilities"]) == CLASSES
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert body["notice"] == RESEARCH_NOTICE and body["dataset_version"] == "test"
    assert body["model"]["name"] == "test_efficientnet"
    return body


def test_health_and_page(client) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["classes"] == CLASSES and h["auth_required"] is True
    assert h["notice"] == RESEARCH_NOTICE and h["limits"]["max_pixels"] == 1_000_000
    page = client.get("/")
    assert page.status_code == 200 and RESEARCH_NOTICE in page.text and "{{" not in page.text
    csp = page.headers["content-security-policy"]
    assert "connect-src 'self'" in csp and "http" not in csp  # nothing off-origin: the page works offline
    assert "http://" not in page.text.replace("http://' + ", "") and "https://" not in page.text
    assert client.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]


def test_predict_real_xray_with_cam(client, xray) -> None:
    body = _ok(client, *xray, cam="true")
    assert (body["format"], body["width"], body["height"]) == ("JPEG", 512, 512)
    cam = Image.open(io.BytesIO(base64.b64decode(body["cam_png_base64"])))
    assert cam.format == "PNG" and cam.mode == "RGB" and min(cam.size) > 0
    assert "cam_png_base64" not in _ok(client, *xray)  # only when asked


def test_predict_real_dicom(tiny_bundle: Path) -> None:
    """The pydicom-data chest CR (1955 x 1841, MONOCHROME1, 15-bit), under an unauthenticated server."""
    from cxrlab.serve import ServeSettings, create_app

    data = pytest.importorskip("pydicom.data")
    raw = Path(data.get_testdata_file("RG1_UNCR.dcm")).read_bytes()
    with fastapi_testclient.TestClient(create_app(tiny_bundle, ServeSettings(device="cpu", max_upload_mb=16))) as c:
        r = c.post("/predict", files={"file": ("scan", raw, "image/png")})  # no extension, wrong declared type
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["format"], body["width"], body["height"]) == ("DICOM", 1841, 1955)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("headers", "detail"),
    [({}, "missing bearer token"), ({"Authorization": "Bearer wrong"}, "wrong"), ({"Authorization": TOKEN}, "missing")],
)
def test_token_required(client, xray, headers, detail) -> None:
    r = client.post("/predict", files={"file": xray}, headers=headers)
    assert r.status_code == 401 and detail in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_bad_inputs_get_their_4xx_and_server_keeps_serving(client, xray) -> None:
    def post(files=None, **kw):
        return client.post("/predict", files=files, headers={**AUTH, **kw.pop("headers", {})}, **kw)

    cases = {
        # content is sniffed: a text file named .png and declared image/png is not an image
        "non-image": (post({"file": ("scan.png", b"patient notes, not pixels\n" * 20, "image/png")}), 415),
        "pdf": (post({"file": ("x.jpg", b"%PDF-1.7\n" + b"0" * 300, "image/jpeg")}), 415),
        # a format the reader knows but the server does not accept
        "gif": (post({"file": ("x.gif", b"GIF89a" + b"\0" * 200, "image/gif")}), 415),
        "oversize": (post({"file": ("big.jpg", xray[1][:3] + b"\0" * (1024 * 1024 + 10), "image/jpeg")}), 413),
        # 1200 x 1000 = 1.2 MP > 1 MP, but only a few KB: refused from the header, before decoding
        "pixels": (post({"file": ("wide.png", _png((1000, 1200)), "image/png")}), 413),
        "truncated": (post({"file": ("cut.jpg", xray[1][:2000], "image/jpeg")}), 422),
        "empty": (post({"file": ("e.png", b"", "image/png")}), 422),
        "no file field": (post(data={"other": "1"}, files={"x": ("a", b"1")}), 422),
        "not multipart": (post(content=xray[1], headers={"content-type": "image/jpeg"}), 415),
    }
    for name, (r, code) in cases.items():
        assert r.status_code == code, (name, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and len(detail) > 10, (name, detail)
    assert "1,200,000 pixels" in cases["pixels"][0].json()["detail"]
    _ok(client, *xray)  # still serving


def test_oversize_without_content_length_is_cut_off(client) -> None:
    """A chunked upload has no Content-Length: the body is counted while it streams and refused past the limit."""
    sent = []

    def body():
        boundary = b"--b0undary\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n\x89PNG\r\n\x1a\n'
        for _ in range(40):  # 40 x 64 KiB = 2.5 MiB > 1 MiB
            sent.append(1)
            yield b"\0" * 65536
        yield b"\r\n--b0undary--\r\n"

    r = client.post(
        "/predict", content=body(), headers={**AUTH, "content-type": "multipart/form-data; boundary=b0undary"}
    )
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_concurrent_requests_are_batched(client, xray, monkeypatch) -> None:
    """Requests that arrive while a forward pass runs share the next forward passes, and each gets its own answer.
    The first pass is held until the other requests are queued, so batching is certain, not a race."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    worker = client.app.state.worker
    images = [xray[1], _png((300, 200))]
    refs = [list(_ok(client, "ref", img)["probabilities"].values()) for img in images]
    assert not np.allclose(refs[0], refs[1], atol=1e-6)  # distinguishable answers

    gate, entered = threading.Event(), threading.Event()
    held: list[int] = []  # size of the held first batch (requests that arrived together may share it)
    forward = worker.predictor.forward

    def held_forward(x):
        if not entered.is_set():  # the first pass waits until every other request is queued behind it
            held.append(len(x))
            entered.set()
            assert gate.wait(120), "gate never opened"
        return forward(x)

    monkeypatch.setattr(worker.predictor, "forward", held_forward)
    before_req, before_batches = worker.requests, worker.batches
    n = 12
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(_ok, client, f"img{i}", images[i % 2]) for i in range(n)]
        assert entered.wait(120), "no forward pass started"
        deadline = time.monotonic() + 120
        while held[0] + worker._q.qsize() < n:  # a condition, not a timing guess: wait until the rest are queued
            assert time.monotonic() < deadline, f"{held[0]} held, only {worker._q.qsize()} queued of {n}"
            time.sleep(0.01)
        gate.set()
        bodies = [f.result(timeout=120) for f in futures]
    assert worker.requests - before_req == n
    # the held pass, then the queued rest in passes of at most max_batch=4
    assert worker.batches - before_batches == 1 + -(-(n - held[0]) // 4) < n, (held, worker.batches - before_batches)
    for i, body in enumerate(bodies):  # nobody got another request's answer, whichever batch it landed in
        np.testing.assert_allclose(list(body["probabilities"].values()), refs[i % 2], atol=1e-5)


def test_serve_cli_builds_the_app_and_runs_uvicorn(tiny_bundle: Path, monkeypatch, capsys) -> None:
    """`cxrlab serve` parses its options into ServeSettings, loads the model and hands the app to uvicorn."""
    import uvicorn

    from cxrlab.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("CXRLAB_TOKEN", "from-env")
    args = [
        "serve",
        str(tiny_bundle),
        "--port",
        "8123",
        "--max-upload-mb",
        "2",
        "--max-pixels",
        "5000",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    s = seen["app"].state.settings
    assert (s.token, s.max_upload_bytes, s.max_pixels) == ("from-env", 2 * 1024 * 1024, 5000)
    assert RESEARCH_NOTICE in " ".join(capsys.readouterr().out.split())
    assert main(["serve", str(tiny_bundle), "--max-upload-mb", "0"]) == 2  # validated: a clear error, no server
