"""The API served for real (uvicorn on a free loopback port), for clients that speak HTTP over
a socket: the Python client, the CLI, a browser."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from tests.service.factories import free_port, wait_for


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` on a thread of this process; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=30, what="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
