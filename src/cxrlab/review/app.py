"""The review web app: one page that walks a reader through a run's explained images, on the FastAPI stack of
``cxrlab serve`` (loopback by default, the same bearer-token option, a strict Content-Security-Policy, no CDN).

Endpoints (all JSON under ``/api`` need ``Authorization: Bearer <token>`` when a token is set; the page asks for
it and keeps it in the tab's sessionStorage):

- ``GET /``: the page (``static/review.html``).
- ``GET /api/info``: run, model, classes, queue size, whether a token is needed, the default reader.
- ``GET /api/items?reader=R``: the queue (label, prediction, score, probabilities, error or not) with R's answers.
- ``GET /api/image/{i}/{image|overlay|original}``: the model input, its Grad-CAM overlay (both from explain's
  thumbnails), or the original file rendered as PNG.
- ``PUT /api/answers/{i}``: save R's answer on item i (replaces R's earlier answer on it); returns the progress.
- ``GET /api/progress?reader=R``: answered / total for R and for everyone.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from cxrlab.review.config import ReviewSettings
from cxrlab.review.core import ReviewQueue
from cxrlab.review.store import Answer, ReviewStore


def _require_token(request: Request, token: str | None) -> None:
    from cxrlab.serve.http import check_token  # the service's token check (lazy: serve imports the model stack)

    check_token(request, token)


def create_review_app(queue: ReviewQueue, store: ReviewStore, settings: ReviewSettings | None = None) -> FastAPI:
    """The review service for ``queue``, answers in ``store``."""
    import cxrlab

    s = settings or ReviewSettings()
    from cxrlab.serve.http import static_page  # the same offline page + CSP builder as the prediction service

    page, csp = static_page("cxrlab.review", "static/review.html")
    app = FastAPI(title="cxrlab review", version=cxrlab.__version__, docs_url=None, redoc_url=None)
    app.state.queue, app.state.store, app.state.settings = queue, store, s
    n = len(queue.items)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    def item(i: int):
        if not 0 <= i < n:
            raise HTTPException(404, f"no item {i}: the queue has items 0..{n - 1}")
        return queue.items[i]

    def progress(reader: str) -> dict[str, Any]:
        rows = store.answers(queue.run_id)
        keys = {it.image for it in queue.items}
        mine = {r["image"] for r in rows if r["reader"] == reader and r["image"] in keys}
        return {
            "answered": len(mine),
            "total": n,
            "all_answers": sum(r["image"] in keys for r in rows),
            "readers": sorted({r["reader"] for r in rows}),
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        headers = {
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        }
        return HTMLResponse(page, headers=headers)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "run_id": queue.run_id,
            "model": queue.model,
            "split": queue.split,
            "classes": queue.classes,
            "total": n,
            "errors": queue.n_errors,
            "explained": queue.n_explained,
            "auth_required": s.token is not None,
            "reader": s.reader,
            "notice": cxrlab.RESEARCH_NOTICE,
        }

    @app.get("/api/items")
    def items(request: Request, reader: str = Query("", max_length=100)) -> dict[str, Any]:
        _require_token(request, s.token)
        mine = {r["image"]: r for r in store.answers(queue.run_id, reader=reader.strip())} if reader.strip() else {}
        out = []
        for it in queue.items:
            a = mine.get(it.image)
            out.append(
                {
                    "index": it.index,
                    "name": it.image.rsplit("/", 1)[-1],
                    "label": it.label,
                    "prediction": it.prediction,
                    "confidence": it.confidence,
                    "correct": it.correct,
                    "probabilities": it.probabilities,
                    "answer": None
                    if a is None
                    else {
                        k: a[k]
                        for k in ("label_ok", "corrected_label", "localisation", "region", "note", "answered_at")
                    },
                }
            )
        return {"items": out, "progress": progress(reader.strip())}

    @app.get("/api/image/{i}/{kind}")
    def image(request: Request, i: int, kind: str) -> Response:
        _require_token(request, s.token)
        it = item(i)
        if kind in ("image", "overlay"):
            p = it.thumb if kind == "image" else it.overlay
            if not p.is_file():
                raise HTTPException(404, f"{p} is missing; rerun `cxrlab explain` on the run")
            return FileResponse(p, headers={"Cache-Control": "private, max-age=3600"})
        if kind == "original":
            import cv2

            from cxrlab.data.io import ImageReadError, read_xray

            try:
                gray = read_xray(it.image)
            except (ImageReadError, FileNotFoundError, OSError) as e:
                raise HTTPException(404, f"original {it.image} cannot be read: {e}") from None
            return Response(cv2.imencode(".png", gray)[1].tobytes(), media_type="image/png")
        raise HTTPException(404, f"unknown image kind {kind!r}: image | overlay | original")

    @app.put("/api/answers/{i}")
    def answer(request: Request, i: int, body: Answer) -> dict[str, Any]:
        _require_token(request, s.token)
        it = item(i)
        if body.label_ok is False and body.corrected_label and body.corrected_label not in queue.classes:
            raise HTTPException(422, f"corrected_label {body.corrected_label!r} is not one of {queue.classes}")
        store.save(queue.info(it.index), body)
        return {"saved": i, "progress": progress(body.reader)}

    @app.get("/api/progress")
    def get_progress(request: Request, reader: str = Query("", max_length=100)) -> dict[str, Any]:
        _require_token(request, s.token)
        return progress(reader.strip())

    return app
