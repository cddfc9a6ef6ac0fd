"""Slow and vanishing clients against a real uvicorn server (raw sockets; issue 12, item 7): a stalled upload gets
408 and its socket is closed, a connection that never finishes its headers is closed, and a client that hangs
up mid-upload does not make the application raise (which uvicorn logs as a full ASGI traceback)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

STALL_S = 1.0
WAIT_S = 30.0  # generous upper bound for what should take ~STALL_S: a loaded CI machine must not fail it


class Recorder:
    """ASGI wrapper: records, per finished /predict request, the exception that escaped the app (or None)."""

    def __init__(self, app) -> None:
        self.app, self.outcomes, self.done = app, [], threading.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict":
            return await self.app(scope, receive, send)
        try:
            await self.app(scope, receive, send)
            self.outcomes.append(None)
        except BaseException as e:
            self.outcomes.append(e)
            raise
        finally:
            self.done.set()


@pytest.fixture(scope="module")
def server(tiny_bundle: Path):
    import uvicorn

    from cxrlab.serve import ServeSettings, create_app
    from cxrlab.serve.http import http_protocol

    app = Recorder(create_app(tiny_bundle, ServeSettings(device="cpu", stall_timeout_s=STALL_S)))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", http=http_protocol(STALL_S), timeout_keep_alive=1
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not (srv.started and srv.servers):
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield app, port
    srv.should_exit = True
    thread.join(WAIT_S)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout after WAIT_S otherwise)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _upload_head(length: int) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
        f"Content-Length: {length}\r\n\r\n"
        '--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n\x89PNG\r\n"
    ).encode("latin-1")


def test_stalled_upload_gets_408_and_its_socket_is_closed(server) -> None:
    app, port = server
    app.done.clear()
    with _connect(port) as s:
        s.sendall(_upload_head(100_000))  # promises 100 kB, sends ~150 bytes, then nothing
        answer = _read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"upload stalled" in answer
    assert app.done.wait(WAIT_S) and app.outcomes[-1] is None


def test_connection_without_complete_headers_is_closed(server) -> None:
    _, port = server
    with _connect(port) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # the blank line that ends the headers never comes
        assert _read_until_closed(s) == b""


def test_many_stalled_sockets_are_all_closed(server) -> None:
    _, port = server
    socks = [_connect(port) for _ in range(20)]
    try:
        for i, s in enumerate(socks):
            s.sendall(_upload_head(100_000) if i % 2 else b"GET /health HTTP/1.1\r\n")
        for s in socks:
            _read_until_closed(s)  # raises socket.timeout if any stays open
    finally:
        for s in socks:
            s.close()


def test_client_disconnect_mid_upload_raises_nothing_in_the_app(server) -> None:
    app, port = server
    app.done.clear()
    n = len(app.outcomes)
    s = _connect(port)
    s.sendall(_upload_head(100_000))
    time.sleep(0.2)  # let the server start reading the body (the outcome is the same if it has not yet)
    s.close()
    assert app.done.wait(WAIT_S), "the request never finished after the client left"
    assert len(app.outcomes) == n + 1 and app.outcomes[-1] is None, repr(app.outcomes[-1])
    with _connect(port) as s2:  # and the server keeps serving
        s2.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_until_closed(s2).startswith(b"HTTP/1.1 200")
