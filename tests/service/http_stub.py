"""An HTTP endpoint on loopback for a test to point the service at (a reward's scoring endpoint, a
webhook receiver): a real server in a thread of its own, answering each POST as its subclass says.
The service's settings must list 127.0.0.1 in ``allow_private_hosts`` for it to call one."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class LoopbackEndpoint:
    """A ``ThreadingHTTPServer`` on a free loopback port, serving until ``close()`` (or the end of
    its ``with``). Each POST's body goes to ``answer``, whose ``(status, JSON body)`` is sent back;
    ``None`` sends nothing (the caller hung up)."""

    path = "/score"  # what ``url`` names; every path is answered alike

    def __init__(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                reply = endpoint.answer(self, self.rfile.read(int(self.headers["content-length"])))
                if reply is None:
                    return
                status, body = reply
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, Any] | None:
        """The status and JSON body that answer one POST (``request``: its headers and connection)."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{self.path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
