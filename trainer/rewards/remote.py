"""The ``http`` reward: POST the batch to the user's scoring endpoint.

Request ``{"prompts": [...], "completions": [...], "rows": [...]}``; expected answer
``{"rewards": [float, ...]}``, one per completion. Anything else fails the whole batch.

The call goes through ``trainer.net.post_json``: loopback, private, link-local and other
non-public addresses are refused unless the operator lists the host (``OperatorPolicy``'s
``allow_private_hosts``, the ``GRPO_ALLOW_PRIVATE_HOSTS`` setting); a spec cannot (its former
``allowed_hosts`` option is refused with a pointer to that setting: the spec is the tenant's, the
network is the operator's). Connection errors and 5xx answers are retried with bounded
exponential backoff, and ``retried`` counts those retries.

A stopped batch (``stop.py``) does not wait for the endpoint: its connections are shut down at
once, and a retry's backoff ends early.
"""

from __future__ import annotations

import math
import socket
import threading
from contextlib import nullcontext
from typing import Any

from trainer.config import ConfigError, OperatorPolicy
from trainer.net import (
    ALLOW_PRIVATE_HOSTS_ENV,
    MAX_RETRIES,
    OutboundError,
    check_url_literal,
    post_json,
    redact_url,
)
from trainer.rewards.base import Option, RewardError, RewardType, Scores
from trainer.rewards.stop import check_stop, current_stop


class HttpReward:
    def __init__(self, spec: dict[str, Any], policy: OperatorPolicy):
        import httpx

        self.url = spec["url"]
        self.shown_url = redact_url(self.url)
        self.retries = spec["retries"]
        self.timeout_s = spec["timeout_s"]
        self.headers = spec["headers"] or {}
        self.allowed_hosts = policy.allow_private_hosts
        self.connections = CuttableConnections()
        transport = httpx.HTTPTransport(trust_env=False)
        transport._pool._network_backend = (
            self.connections
        )  # httpx has no public way to hand httpcore a backend
        self.client = httpx.Client(
            transport=transport, timeout=self.timeout_s, trust_env=False, follow_redirects=False
        )
        self.retried = 0

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> Scores:
        stop = current_stop()
        with stop.on_stop(self.connections.cut) if stop is not None else nullcontext():
            response = self._post({"prompts": prompts, "completions": completions, "rows": rows})
        try:
            rewards = response.json()["rewards"]
        except (ValueError, KeyError, TypeError):
            raise RewardError(
                f'POST {self.shown_url}: expected a JSON object {{"rewards": [numbers]}}, got '
                f"{response.text[:200]!r}"
            ) from None
        if not isinstance(rewards, list) or len(rewards) != len(completions):
            count = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
            raise RewardError(
                f"POST {self.shown_url}: expected {len(completions)} rewards, one per completion, got {count}"
            )
        for index, value in enumerate(rewards):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise RewardError(
                    f"POST {self.shown_url}: rewards[{index}] is {value!r}, not a finite number"
                )
        return [float(value) for value in rewards]

    def _post(self, payload: dict[str, Any]):
        def count_retry(reason: str) -> None:
            self.retried += 1

        stop = current_stop()
        try:
            return post_json(
                self.url,
                payload,
                allowed_hosts=self.allowed_hosts,
                timeout_s=self.timeout_s,
                retries=self.retries,
                headers=self.headers,
                client=self.client,
                on_retry=count_retry,
                sleep=stop.sleep if stop is not None else None,
            )
        except OutboundError as exc:
            raise RewardError(str(exc)) from None

    def close(self) -> None:
        self.client.close()


class CuttableConnections:
    """httpcore's network backend (the sync one), able to cut every open connection at once
    from another thread (``cut``). It shuts down a duplicate of each connection's socket: that
    wakes a thread blocked reading or writing it, TLS or not, and leaves closing the socket
    to its owner, httpcore."""

    def __init__(self) -> None:
        import httpcore

        self._backend = httpcore.SyncBackend()
        self._lock = threading.Lock()
        self._open: dict[int, socket.socket] = {}  # id of the stream -> a duplicate of its socket

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> Any:
        check_stop()  # no new connection (a retry) for a stopped batch
        stream = self._backend.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        return _CuttableStream(stream, self)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise OSError("unix sockets are not used by http rewards")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)

    def cut(self) -> None:
        with self._lock:
            for handle in self._open.values():
                try:
                    handle.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the peer

    def _track(self, stream: _CuttableStream, sock: socket.socket) -> None:
        with self._lock:
            self._open[id(stream)] = sock.dup()

    def _forget(self, stream: _CuttableStream) -> None:
        with self._lock:
            handle = self._open.pop(id(stream), None)
        if handle is not None:
            handle.close()


class _CuttableStream:
    """A connection's stream that ``CuttableConnections.cut`` can shut down (httpcore's NetworkStream)."""

    def __init__(self, stream: Any, connections: CuttableConnections) -> None:
        self._stream = stream
        self._connections = connections
        connections._track(self, stream.get_extra_info("socket"))

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._connections._forget(self)

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> Any:
        try:  # TLS wraps the same socket: the duplicate still reaches it
            self._stream = self._stream.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            self._connections._forget(self)
            raise
        return self

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _check_http(spec: dict[str, Any], param: str) -> None:
    if not spec["url"].startswith(("http://", "https://")):
        raise ConfigError(f"{param}.url", f"must be an http:// or https:// URL, got {spec['url']!r}")
    if spec["retries"] > MAX_RETRIES:
        raise ConfigError(f"{param}.retries", f"must be <= {MAX_RETRIES}, got {spec['retries']}")
    if spec["allowed_hosts"] is not None:
        raise ConfigError(
            f"{param}.allowed_hosts",
            "is an operator setting, not a reward option: which loopback, "
            f"private or link-local hosts the workers may call is set by {ALLOW_PRIVATE_HOSTS_ENV} on "
            "the API and the workers; remove allowed_hosts from the spec (and ask the operator to "
            "list your host if it is not a public one)",
        )
    del spec[
        "allowed_hosts"
    ]  # an option only to be refused with that pointer; never part of a normalised spec


def _check_http_policy(spec: dict[str, Any], param: str, policy: OperatorPolicy) -> None:
    """A non-public address written in the URL is refused before anything runs; a host name is
    resolved and checked again before every call."""
    try:
        check_url_literal(spec["url"], policy.allow_private_hosts)
    except OutboundError as exc:
        raise ConfigError(f"{param}.url", str(exc)) from None


HTTP = RewardType(
    summary='rewards from POSTing the batch to url, which answers {"rewards": [...]}',
    options={
        "url": Option("string", example='"https://scorer.example.com/score"'),
        "timeout_s": Option("number", 30.0, above=0),
        "headers": Option("headers", None),
        "retries": Option("integer", 2, minimum=0),
        "allowed_hosts": Option("strings", None),  # refused: GRPO_ALLOW_PRIVATE_HOSTS is the operator's
    },
    check=_check_http,
    check_policy=_check_http_policy,
    build=lambda spec, *, policy, **_: HttpReward(spec, policy),
)
