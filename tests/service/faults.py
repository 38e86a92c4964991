"""Things a fault test breaks on purpose, each of its own: a Redis, a TCP proxy in front of
PostgreSQL that can cut every connection, an API process that can be killed, a scoring endpoint
that answers what the test says. Each is started on a free port and stopped by the test that
made it; the machine's shared services are never touched."""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx

from api.main import KEEP_ALIVE_S
from jobs.settings import Settings
from tests.service.factories import ROOT, ChildProcess, free_port, settings_env, wait_for
from tests.service.http_stub import LoopbackEndpoint


class RedisServer:
    """``redis-server`` on a free port that keeps nothing on disk: ``stop()`` loses every key."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        log = (self.directory / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._answers, timeout=20, what=f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        import redis

        assert self.process is not None and self.process.poll() is None, "redis-server exited"
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        """``SHUTDOWN NOSAVE``: queued and unacknowledged messages are gone."""
        import redis

        if self.process is None or self.process.poll() is not None:
            return
        try:
            redis.Redis(port=self.port, socket_timeout=5).shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_port``. ``cut()`` closes every connection and
    refuses new ones (the database is gone, as far as a client can tell) until ``restore()``."""

    def __init__(self, target_port: int):
        self.port, self.target_port = free_port(), target_port
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.closed = threading.Event()
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        listener.settimeout(0.2)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            doomed, self.connections = self.connections, set()
        if listener is not None:
            listener.close()
        for connection in doomed:
            _close(connection)

    def close(self) -> None:
        self.closed.set()
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while not self.closed.is_set() and self.listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _close(client)
                continue
            with self.lock:
                self.connections |= {client, server}
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        with selectors.DefaultSelector() as selector:
            for sock in peers:
                sock.setblocking(True)
                selector.register(sock, selectors.EVENT_READ)
            try:
                while not self.closed.is_set():
                    for key, _ in selector.select(timeout=0.5):
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        peers[key.fileobj].sendall(data)  # type: ignore[index]
            except (OSError, ValueError):
                return
            finally:
                with self.lock:
                    self.connections -= {a, b}
                _close(a)
                _close(b)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class ApiProcess(ChildProcess):
    """``uvicorn api.main:app`` in a process of its own, on a fixed port so that it can be
    killed and started again where clients expect it."""

    def __init__(self, settings: Settings, port: int | None = None):
        self.settings, self.port = settings, port or free_port()
        self.log_path = Path(settings.data_dir) / f"api-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ApiProcess:
        """Start it, and wait up to ``timeout`` seconds for it to answer."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "api.main:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--timeout-keep-alive",
                    str(KEEP_ALIVE_S),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env=settings_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._answers, timeout=timeout, what=f"the API on port {self.port}", interval=0.2)
        return self

    def _answers(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log()
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False


Answer = Callable[[int, int], tuple[int, dict[str, Any]]]


class ScoringEndpoint(LoopbackEndpoint):
    """An ``http`` reward's endpoint on loopback: ``answer(call, completions)`` gives the status
    and JSON body of the ``call``-th request (1-based), which scores ``completions`` completions."""

    def __init__(self, answer: Answer):
        self.calls = 0
        self.script = answer
        super().__init__()

    def answer(self, request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, Any]:
        self.calls += 1
        return self.script(self.calls, len(json.loads(body)["completions"]))

    def reward(self, **options: Any) -> dict[str, Any]:
        """An ``http`` reward spec for this endpoint (on loopback: the workers' settings must list
        127.0.0.1 in ``allow_private_hosts``, as ``redis_worker_settings`` does)."""
        return {"type": "http", "url": self.url, "retries": 0, **options}
