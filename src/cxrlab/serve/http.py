"""What a client may send the service and how long it may take: upload size, pixels, stalls, the bearer token;
the offline page with its Content-Security-Policy; the HTTP protocol with a header timeout.

uvicorn times out idle keep-alive connections but neither a connection that never finishes its request headers
nor an upload that stops sending: 50 such sockets stayed open for good. ``limited_request`` answers a stalled
upload with 408 (no bytes for ``stall_s``) and :func:`http_protocol` closes a connection whose first request
headers have not arrived within the same time.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import secrets
import warnings
from importlib import resources

import anyio
from fastapi import HTTPException, Request

import cxrlab

MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file in a multipart body

# ------------------------------------------------------------------------------------------ input checks


class BodyTooLarge(Exception):
    pass


class TooManyPixels(Exception):
    pass


class BodyStalled(Exception):
    pass


def limited_request(request: Request, limit: int, stall_s: float) -> Request:
    """The same request whose body stream raises ``BodyTooLarge`` once more than ``limit`` bytes arrived, and
    ``BodyStalled`` when no message arrives for ``stall_s`` seconds (a stalled upload would otherwise hold its
    socket and its multipart parser forever)."""
    seen = 0
    receive = request.receive

    async def counting_receive():
        nonlocal seen
        try:
            with anyio.fail_after(stall_s):
                message = await receive()
        except TimeoutError:
            raise BodyStalled from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge
        return message

    return Request(request.scope, counting_receive)


def probe_dims(data: bytes, fmt: str, name: str) -> tuple[int, int]:
    """(width, height) from the header alone (PIL's lazy open; pydicom without pixel data)."""
    if fmt == "DICOM":
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return int(ds.Columns), int(ds.Rows) * frames
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit decides
        try:
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                return im.size
        except Image.DecompressionBombError as e:  # above twice Pillow's limit: too large, not corrupt (413)
            raise TooManyPixels(str(e)) from None


def check_token(request: Request, token: str | None) -> None:
    if token is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise HTTPException(
            401, "missing bearer token: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"}
        )
    if not secrets.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "wrong bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})


def mb(n: float) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


# --------------------------------------------------------------------------------------------------- page


def static_page(package: str, resource: str) -> tuple[str, str]:
    """A packaged offline page (``{{NOTICE}}`` filled in) and its Content-Security-Policy: inline script/style
    allowed by hash, nothing off-origin. Used by the prediction page and the review page."""
    import html as htmllib

    html = resources.files(package).joinpath(resource).read_text(encoding="utf-8")
    html = html.replace("{{NOTICE}}", htmllib.escape(cxrlab.RESEARCH_NOTICE))

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found)

    script, style = hashes("script") or "'none'", hashes("style") or "'none'"
    csp = (
        f"default-src 'none'; script-src {script}; style-src {style}; "
        "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
    return html, csp


# ------------------------------------------------------------------------------------------ http protocol


def http_protocol(stall_s: float) -> type:
    """uvicorn's h11 protocol, plus a header timeout: a connection that has not sent a complete request within
    ``stall_s`` seconds of opening is closed (uvicorn's own keep-alive timeout starts only after a response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class StallTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.header_timer = self.loop.call_later(stall_s, self.header_timeout)

        def header_timeout(self) -> None:
            if self.cycle is None and not self.transport.is_closing():  # no request has arrived in full
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self.header_timer.cancel()
            super().connection_lost(exc)

    return StallTimeoutH11Protocol
