"""HTTP service: one model, loaded once, behind ``POST /predict``, ``GET /health`` and a single offline web page.

Endpoints:

- ``GET /``: the web page (``static/index.html``; no CDN, no external request: its Content-Security-Policy
  only allows this origin). Drop or pick an X-ray; it shows the label, probability bars, the Grad-CAM overlay
  and the research notice.
- ``POST /predict[?cam=true]``: multipart form with one ``file`` field (PNG, JPEG or DICOM) -> JSON
  ``{label, probabilities, model, dataset_version, notice, width, height, format, ood[, cam_png_base64]}``;
  ``ood`` is ``{flag, score, reasons}`` (:mod:`cxrlab.analysis.shift`: the image is unlike the training images; the page
  shows a banner) or null for a bundle without shift statistics.
- ``GET /health``: liveness plus model, classes, limits and whether a token is required.
- ``GET /docs``: OpenAPI docs (FastAPI's default page, which loads Swagger UI from a CDN; only that page does).

Every bad input gets a 4xx JSON ``{"detail": "<what is wrong and what to do>"}``:
401 missing/wrong bearer token; 408 upload stalled (no bytes for ``stall_timeout_s``; a connection that has not
sent its request headers by then is closed, see :mod:`cxrlab.serve.http`); 413 upload above ``max_upload_mb``
(rejected from ``Content-Length`` before the body is read, and by counting bytes while reading when there is
none) or image above ``max_pixels`` (checked from the header before any pixel is decoded); 415 not multipart,
or content that does not sniff as an accepted image format (the extension and declared content type are
ignored); 422 no ``file`` field, empty, corrupt or
undecodable image. Uploads are decoded from memory; the only thing that may touch disk is Starlette's
multipart spooling (a ``SpooledTemporaryFile`` in the system temp dir above 1 MB, deleted on close).

Concurrency: a single inference thread owns the model and takes every job from a queue. PyTorch and ONNX
Runtime already spread one forward pass over all cores, so two concurrent forward passes on a CPU would only
oversubscribe them (measured: torch at 2 threads on 2 busy cores ran batch-1 inference 20x slower than at 1).
Requests that arrive while a forward pass runs are merged into the next batch (greedy batching up to
``max_batch``, default 8, with no waiting timer, so an idle server adds no latency and ``max_batch=1`` is a
plain lock). On this 2-core CPU bench_serve.py measured greedy batching as neutral (mean batch ~3.7 under 8
concurrent clients; requests/s and p50/p95 within +-10% of ``max_batch=1``, inside the run-to-run noise): a CPU
gains little per image from larger batches. It is kept as the default because it costs nothing when idle and
pays on a GPU.
Decoding and preprocessing (PIL/pydicom/OpenCV, which release the GIL) run concurrently in a bounded
threadpool. Grad-CAM jobs go through the same thread because they register hooks on the shared model.
"""

from __future__ import annotations

import asyncio
import base64
import queue
import threading
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import UnidentifiedImageError

import cxrlab
from cxrlab.errors import CxrlabError
from cxrlab.inference.predict import Predictor, encode_png
from cxrlab.serve.http import (
    MULTIPART_SLACK,
    BodyStalled,
    BodyTooLarge,
    TooManyPixels,
    check_token,
    limited_request,
    mb,
    probe_dims,
    static_page,
)
from cxrlab.serve.settings import ServeSettings

# --------------------------------------------------------------------------------------- inference worker


class _Job:
    __slots__ = ("kind", "payload", "future")

    def __init__(self, kind: str, payload: Any) -> None:
        self.kind, self.payload, self.future = kind, payload, Future()


class InferenceWorker:
    """One thread that owns the model: greedy batching of ``predict`` jobs, ``cam`` jobs one at a time."""

    def __init__(self, predictor: Predictor, max_batch: int = 8) -> None:
        self.predictor, self.max_batch = predictor, max_batch
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="cxrlab-inference", daemon=True)
        self._thread.start()
        self.batches = 0  # forward passes run (a batch may hold several requests)
        self.requests = 0

    async def probabilities(self, x: torch.Tensor) -> np.ndarray:
        """Class probabilities for one preprocessed image (C x H x W)."""
        return (await self.scored(x))[0]

    async def scored(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(class probabilities, penultimate features or None) for one preprocessed image (C x H x W)."""
        return await self._submit("predict", x)

    async def cam(self, gray: np.ndarray) -> np.ndarray:
        """Grad-CAM overlay (H x W x 3 uint8) of the predicted class."""
        return await self._submit("cam", gray)

    async def _submit(self, kind: str, payload: Any) -> Any:
        if not self._thread.is_alive():
            raise RuntimeError("the inference thread has stopped")
        job = _Job(kind, payload)
        self._q.put(job)
        return await asyncio.wrap_future(job.future)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if job.kind == "cam":
                self._do(lambda j=job: self.predictor.cam_overlays([j.payload])[0], [job], single=True)
                continue
            batch = [job]
            deferred: list[_Job | None] = []
            while len(batch) < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is not None and nxt.kind == "predict":
                    batch.append(nxt)
                else:
                    deferred.append(nxt)
                    break
            self._do(lambda b=batch: _rows(self.predictor.forward_scored(torch.stack([j.payload for j in b]))), batch)
            for d in deferred:  # a cam job or the stop signal that interrupted the batch
                if d is None:
                    return
                self._do(lambda j=d: self.predictor.cam_overlays([j.payload])[0], [d], single=True)

    def _do(self, fn, jobs: list[_Job], single: bool = False) -> None:
        try:
            out = fn()
        except Exception as e:  # a failed forward pass fails its requests (500), never the worker thread
            for j in jobs:
                j.future.set_exception(e)
            return
        self.batches += 1
        self.requests += len(jobs)
        if single:
            jobs[0].future.set_result(out)
        else:
            for j, row in zip(jobs, out, strict=True):
                j.future.set_result(row)


def _rows(scored: tuple[np.ndarray, np.ndarray | None]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """A batch's (probabilities, features or None) -> one (probabilities, features) pair per image."""
    probs, feats = scored
    return [(p, feats[i] if feats is not None else None) for i, p in enumerate(probs)]


# ----------------------------------------------------------------------------------------------- self-check


class ServeError(CxrlabError):
    """The service cannot start (its model fails the self-check)."""


def probe_images(size: tuple[int, int]) -> list[np.ndarray]:
    """Built-in probe images (2-D uint8) of the bundle's input size: a synthetic chest phantom, a ramp and black."""
    import cv2

    from cxrlab.data.synth import make_phantom

    h, w = size
    phantom = make_phantom("NORMAL", np.random.default_rng(0), size=256)
    phantom = cv2.resize(phantom, (w, h), interpolation=cv2.INTER_AREA)
    ramp = np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1)).astype(np.uint8)
    return [phantom, ramp, np.zeros((h, w), np.uint8)]


def self_check(predictor: Predictor) -> None:
    """Run the model on the built-in probe images; non-finite output raises ``ServeError`` (a service that would
    answer every request with NaN or 500 must not report itself healthy)."""
    grays = probe_images(predictor.meta.img_size)
    probs = predictor.forward(torch.stack([predictor.preprocess(g) for g in grays]))
    if not np.all(np.isfinite(probs)):
        raise ServeError(
            f"refusing to serve {predictor.bundle.path}: the model gives non-finite output (NaN/inf) on the built-in "
            "probe images, so every prediction would be meaningless. The weights or the normalisation (mean/std in "
            "bundle.json) are broken: copy the bundle again from the run that made it, or retrain"
        )


# ---------------------------------------------------------------------------------------------------- app


def create_app(bundle_path: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """Build the service for ``bundle_path``. The model is loaded here, once, and warmed up."""
    s = settings or ServeSettings()
    predictor = Predictor(bundle_path, backend=s.backend, device=s.device, progress=False)
    max_batch = s.max_batch
    self_check(predictor)  # also the warm-up: the first forward pass is slow
    worker = InferenceWorker(predictor, max_batch=max_batch)
    decode_limiter = anyio.CapacityLimiter(s.decode_workers)
    page, csp = static_page("cxrlab.serve", "static/index.html")
    info = predictor.model_info
    limit = s.max_upload_bytes

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        worker.close()

    app = FastAPI(
        title="cxrlab",
        version=cxrlab.__version__,
        description=f"Chest X-ray classification ({info['name']}: {', '.join(predictor.classes)}). "
        f"{cxrlab.RESEARCH_NOTICE}",
        lifespan=lifespan,
    )
    app.state.predictor, app.state.worker, app.state.settings = predictor, worker, s

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(
            page,
            headers={
                "Content-Security-Policy": csp,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store",
            },
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the model and the input limits."""
        return {
            "status": "ok",
            "model": info,
            "classes": predictor.classes,
            "dataset_version": predictor.meta.dataset_version,
            "auth_required": s.token is not None,
            "limits": {"max_upload_bytes": limit, "max_pixels": s.max_pixels, "formats": list(s.formats)},
            "inference": {"requests": worker.requests, "forward_passes": worker.batches, "max_batch": max_batch},
            # whether every response carries an out-of-distribution flag (bundles trained before it: no)
            "ood_check": predictor.ood is not None,
            "notice": cxrlab.RESEARCH_NOTICE,
        }

    upload_body = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "PNG/JPEG/DICOM"}},
                }
            }
        },
    }

    @app.post(
        "/predict",
        openapi_extra={"requestBody": upload_body},
        responses={401: {}, 408: {}, 413: {}, 415: {}, 422: {}},
    )
    async def predict(request: Request, cam: bool = Query(False, description="add a Grad-CAM overlay PNG")):
        """Classify one uploaded X-ray (multipart field ``file``)."""
        check_token(request, s.token)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
            raise HTTPException(413, f"upload of {mb(int(declared))} exceeds the limit of {mb(limit)}")
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise HTTPException(
                415, f"send multipart/form-data with the image in a field named 'file' (got {ctype or 'no type'!r})"
            )
        from starlette.formparsers import MultiPartException
        from starlette.requests import ClientDisconnect

        try:
            limited = limited_request(request, limit + MULTIPART_SLACK, s.stall_timeout_s)
            async with limited.form(max_files=1, max_fields=8) as form:
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise HTTPException(422, "no file: send the image in a multipart field named 'file'")
                name = Path(upload.filename or "upload").name
                data = await upload.read(limit + 1)
        except BodyTooLarge:
            raise HTTPException(413, f"upload exceeds the limit of {mb(limit)}") from None
        except BodyStalled:
            raise HTTPException(
                408, f"upload stalled: no bytes arrived for {s.stall_timeout_s:g} s; send the whole file at once"
            ) from None
        except ClientDisconnect:
            # The client went away mid-upload: nobody reads an answer. Returning one (instead of letting the
            # exception reach the server's error middleware) keeps the log to one access line, not a traceback.
            return Response(status_code=499)
        except MultiPartException as e:
            raise HTTPException(400, f"malformed multipart body: {e}") from None
        if len(data) > limit:
            raise HTTPException(413, f"upload exceeds the limit of {mb(limit)}")
        return await _predict_bytes(data, name, cam)

    async def _predict_bytes(data: bytes, name: str, cam: bool) -> dict[str, Any]:
        from cxrlab.data.io import ImageReadError, ImageTooLargeError, sniff_format

        if not data:
            raise HTTPException(422, f"{name}: the file is empty")
        fmt = sniff_format(data[:132], name)
        if fmt is None:
            raise HTTPException(
                415, f"{name} is not an image (its content matches no image format); send {', '.join(s.formats)}"
            )
        if fmt not in s.formats:
            raise HTTPException(415, f"{name} is {fmt}; this server accepts {', '.join(s.formats)}")
        try:
            width, height = probe_dims(data, fmt, name)
        except TooManyPixels as e:
            raise HTTPException(
                413, f"{name}: decompression bomb: {e} (this server's limit: {s.max_pixels:,})"
            ) from None
        except UnidentifiedImageError:
            raise HTTPException(
                422, f"{name}: corrupt {fmt}: has a {fmt} signature but its header cannot be decoded"
            ) from None
        except Exception as e:  # any header parser failure means the same thing to the client
            raise HTTPException(422, f"{name}: corrupt {fmt} header ({type(e).__name__}: {e})") from None
        if width * height > s.max_pixels:
            raise HTTPException(
                413, f"{name} is {width}x{height} = {width * height:,} pixels; the limit is {s.max_pixels:,}"
            )

        def decode() -> tuple[np.ndarray, torch.Tensor, float]:
            from cxrlab.analysis.ood import colour_share
            from cxrlab.data.io import read_xray_bytes

            gray = read_xray_bytes(data, name)
            colour = colour_share(data) if predictor.ood is not None and fmt != "DICOM" else 0.0
            return gray, predictor.preprocess(gray), colour

        try:
            gray, x, colour = await anyio.to_thread.run_sync(decode, limiter=decode_limiter)
        except ImageTooLargeError as e:
            raise HTTPException(413, f"{name}: {e.reason}") from None
        except ImageReadError as e:
            raise HTTPException(422, f"{name}: {e.reason}") from None
        probs, feats = await worker.scored(x)
        pred = predictor.to_prediction(name, probs)
        if not pred.ok:  # non-finite output: a fault of the model, never a label
            raise HTTPException(500, f"{name}: {pred.error}")
        predictor.flag([pred], feats[None] if feats is not None else None, [gray], [colour])
        out: dict[str, Any] = {
            "filename": name,
            "label": pred.label,
            "probabilities": pred.probabilities,
            "model": {k: info[k] for k in ("name", "run_id", "created", "cxrlab_version", "backend")},
            "dataset_version": predictor.meta.dataset_version,
            "format": fmt,
            "width": width,
            "height": height,
            "ood": (
                {"flag": pred.ood, "score": pred.ood_score, "reasons": pred.ood_reasons}
                if pred.ood is not None
                else None
            ),
            "notice": cxrlab.RESEARCH_NOTICE,
        }
        if cam:
            overlay = await worker.cam(gray)
            png = await anyio.to_thread.run_sync(encode_png, overlay, limiter=decode_limiter)
            out["cam_png_base64"] = base64.b64encode(png).decode("ascii")
        return out

    return app
