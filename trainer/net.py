"""Outbound HTTP to URLs that users give (the ``http`` reward, job webhooks), guarded against SSRF.

``check_outbound_url(url, allowed_hosts)`` parses the URL, resolves its host once and refuses it
when any address it resolves to is loopback, link-local (cloud metadata at 169.254.169.254),
private, shared (100.64/10), multicast, unspecified, reserved or otherwise not global, IPv4 and
IPv6 alike, IPv4 embedded in IPv6 (mapped ``::ffff:a.b.c.d``, 6to4, Teredo, NAT64) included.
Numeric spellings (``2130706433``, ``0177.0.0.1``, ``0x7f.1``) resolve to the address they
mean and are judged by it. A host listed in ``allowed_hosts`` (by name, or by address for an IP
entry) is let through: that list is the operator's ``GRPO_ALLOW_PRIVATE_HOSTS`` setting, handed
down by the caller (this module reads no environment), never a job spec's. The answer names the
address to connect to: ``post_json`` connects to
that very address (the Host header and TLS SNI/certificate check still use the name), so a DNS
answer that changes between the check and the connection (rebinding) cannot redirect it.

``post_json(url, payload, ...)`` does one checked POST with a timeout, retrying connection
errors and 5xx answers with bounded exponential backoff. Redirects are not followed and
proxies from the environment are not used: the checked address is the one connected to.
``timeout_s`` is a deadline for each whole attempt (connecting, sending, and reading the whole
answer, headers and body), not a limit on each network read: an endpoint that drips its
answer a byte at a time cannot hold the caller past it. Every network read and write of the
attempt waits at most until the deadline, and the answer is read as a stream and checked against
the deadline (``time.monotonic``) as it arrives. The answer is read into memory up to
``max_answer_bytes`` (MAX_ANSWER_BYTES unless the caller says), and refused past that.

Standard library only at import; httpx is imported when a request is made.
"""

from __future__ import annotations

import contextvars
import ipaddress
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

ALLOW_PRIVATE_HOSTS_ENV = "GRPO_ALLOW_PRIVATE_HOSTS"  # the operator setting that fills allowed_hosts
BACKOFF_S = 0.25  # the first retry's delay, doubled after each retry
MAX_BACKOFF_S = 8.0
MAX_RETRIES = 5
# The most an answer may hold (decoded) before it is refused, unread past that. An http reward's
# {"rewards": [...]} for a batch of 100,000 completions is about 2.5 MB; a webhook's answer is ignored.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# The time.monotonic() deadline of the attempt this thread is making (None: none), for _DeadlineStream.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("outbound_deadline", default=None)


class OutboundError(ValueError):
    """An outbound call that was refused or failed; ``str(exc)`` names the URL and is shown to the user."""


class UnresolvableHost(OutboundError):
    """The URL's host name does not resolve (now)."""


class RefusedUrl(OutboundError):
    """The URL may not be called at all: not http(s), or a non-public address nobody allowed."""


@dataclass(frozen=True)
class OutboundTarget:
    url: str  # as given
    scheme: str
    host: str  # the URL's host name, lower case, without brackets
    port: int
    addresses: tuple[str, ...]  # the checked addresses to connect to, in the resolver's order
    path: str  # path and query
    host_header: str
    auth: tuple[str, str] | None

    def connect_url(self, address: str) -> str:
        """The URL with ``address`` (one of ``addresses``) in place of the host."""
        literal = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{literal}:{self.port}{self.path}"


def redact_url(url: str) -> str:
    """``url`` with the password of its user info, if any, replaced by ``***``: safe for messages."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?#@:]*:)[^/?#@]*@", r"\1***@", url)


def forbidden_reason(address: IPAddress) -> str | None:
    """Why ``address`` may not be called (e.g. "a loopback address"), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
        if address in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        for inner in embedded:
            if inner is not None and (reason := forbidden_reason(inner)):
                return f"{reason} (embedded in {address})"
    checks = [
        ("is_unspecified", "the unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address (where cloud metadata services live)"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_private", "a private address"),
    ]
    for attribute, reason in checks:
        if getattr(address, attribute):
            return reason
    if address in _SHARED or not address.is_global:
        return "not a public address"
    return None


def _allowed(host: str, allowed_hosts: Iterable[str]) -> tuple[bool, set[IPAddress]]:
    """Whether ``host`` is listed by name, and the listed IP addresses."""
    names, addresses = set(), set()
    for entry in allowed_hosts:
        entry = entry.strip().lower().strip("[]")
        try:
            addresses.add(ipaddress.ip_address(entry))
        except ValueError:
            names.add(entry.rstrip("."))
    return host.rstrip(".") in names, addresses


def check_outbound_url(
    url: str, allowed_hosts: Iterable[str] = (), *, resolve: Callable[..., list] = socket.getaddrinfo
) -> OutboundTarget:
    """The checked target of ``url``, or OutboundError saying why it may not be called."""
    shown_url = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError as exc:
        raise RefusedUrl(f"refusing to call {shown_url}: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise RefusedUrl(f"refusing to call {shown_url}: give an http:// or https:// URL with a host")
    host = parts.hostname
    by_name, allowed_addresses = _allowed(host, allowed_hosts)
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableHost(f"cannot call {shown_url}: cannot resolve {host} ({exc})") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not addresses:
        raise OutboundError(f"cannot call {shown_url}: {host} resolves to no address")
    if not by_name:
        for address in addresses:
            reason = forbidden_reason(address)
            if reason and address not in allowed_addresses:
                shown = host if str(address) == host else f"{host} (resolved to {address})"
                raise RefusedUrl(
                    f"refusing to call {shown_url}: {shown} is {reason}; the operator may "
                    f"allow it by listing {host!r} in {ALLOW_PRIVATE_HOSTS_ENV}"
                )
    query = f"?{parts.query}" if parts.query else ""
    auth = (unquote(parts.username), unquote(parts.password or "")) if parts.username is not None else None
    return OutboundTarget(
        url=url,
        scheme=parts.scheme,
        host=host,
        port=port,
        addresses=tuple(dict.fromkeys(map(str, addresses))),
        path=(parts.path or "/") + query,
        host_header=parts.netloc.rpartition("@")[2],
        auth=auth,
    )


def check_url_literal(url: str, allowed_hosts: Iterable[str] = ()) -> None:
    """``check_outbound_url`` without DNS, for validating a spec: refuses a forbidden address written
    in the URL (in any numeric spelling); a host name passes here and is checked when called."""

    def numeric_only(host: str, port: int, **options: Any) -> list:
        return socket.getaddrinfo(host, port, flags=socket.AI_NUMERICHOST, **options)

    try:
        check_outbound_url(url, allowed_hosts, resolve=numeric_only)
    except UnresolvableHost:
        pass


def post_json(
    url: str,
    payload: Any,
    *,
    allowed_hosts: Iterable[str] = (),
    timeout_s: float = 30.0,
    retries: int = 2,
    headers: dict[str, str] | None = None,
    client: Any = None,
    sleep: Callable[[float], None] | None = None,
    on_retry: Callable[[str], None] | None = None,
    max_answer_bytes: int = MAX_ANSWER_BYTES,
):
    """POST ``payload`` as JSON to the checked ``url``: its 2xx ``httpx.Response`` (read whole),
    else OutboundError. ``payload`` is a JSON-able value, or ``bytes`` of JSON already encoded,
    sent as they are (when a signature covers the exact body).

    Each attempt must connect, send and read the whole answer within ``timeout_s`` (a deadline,
    not a per-read timeout; past it: OutboundError "no answer within ... s", not retried), and
    the answer may hold at most ``max_answer_bytes`` (else OutboundError naming the limit).
    Connection errors (connect timeouts included) and 5xx answers are retried up to ``retries``
    times (at most MAX_RETRIES), after BACKOFF_S, 2*BACKOFF_S, ... (at most MAX_BACKOFF_S);
    ``on_retry(reason)`` is told of each. The URL is checked (and resolved) again before every
    attempt, which tries each checked address until one connects (within the attempt's deadline).
    A ``client`` given has its connections' reads and writes bounded by the deadline too (its
    transport's network backend is wrapped once, when it is httpx's usual one).
    """
    import httpx

    sleep = sleep or time.sleep
    retries = min(retries, MAX_RETRIES)
    own_client = client is None
    if own_client:
        transport = httpx.HTTPTransport(trust_env=False)
        client = httpx.Client(transport=transport, timeout=timeout_s, trust_env=False, follow_redirects=False)
    _bound_by_deadlines(client)
    try:
        for attempt in range(retries + 1):
            target = check_outbound_url(url, allowed_hosts)
            response, reason = _post_once(client, target, payload, headers, timeout_s, max_answer_bytes)
            if response is not None:
                if response.is_success:
                    return response
                reason = f"answered HTTP {response.status_code}: {response.text[:200]!r}"
                if response.status_code < 500:
                    redirect = " (redirects are not followed)" if response.is_redirect else ""
                    raise OutboundError(f"POST {redact_url(url)}: {reason}{redirect}")
            if attempt == retries:
                tries = f" after {retries + 1} tries" if retries else ""
                raise OutboundError(f"POST {redact_url(url)}: {reason}{tries}")
            if on_retry is not None:
                on_retry(reason)
            sleep(min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        if own_client:
            client.close()


def _post_once(
    client: Any,
    target: OutboundTarget,
    payload: Any,
    headers: dict[str, str] | None,
    timeout_s: float,
    max_answer_bytes: int,
) -> tuple[Any, str]:
    """(the response, read whole, and "") from the first of the target's addresses that connects
    within the attempt's deadline, else (None, why not)."""
    import httpx

    encoded = isinstance(payload, bytes)
    body = {"content": payload} if encoded else {"json": payload}
    headers = {
        **({"Content-Type": "application/json"} if encoded else {}),
        **(headers or {}),
        "Host": target.host_header,
    }
    shown_url = redact_url(target.url)
    too_late = f"POST {shown_url}: no answer within {timeout_s:g} s (the deadline for the whole answer)"
    deadline = time.monotonic() + timeout_s
    reason = "no address"
    token = _DEADLINE.set(deadline)
    try:
        for address in target.addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break  # the reason of the last address tried stands
            try:
                with client.stream(
                    "POST",
                    target.connect_url(address),
                    auth=target.auth,
                    headers=headers,
                    **body,
                    timeout=remaining,
                    extensions={"sni_hostname": target.host} if target.scheme == "https" else None,
                ) as response:
                    response._content = _read_answer(
                        response, deadline, max_answer_bytes, shown_url, too_late
                    )
                    return response, ""  # .content, .text and .json() use _content, as after read()
            except (httpx.ConnectTimeout, httpx.ConnectError) as exc:
                reason = f"cannot connect ({exc or type(exc).__name__})"
            except httpx.TimeoutException:
                raise OutboundError(too_late) from None
            except httpx.TransportError as exc:
                return None, f"failed ({exc or type(exc).__name__})"
        return None, reason
    finally:
        _DEADLINE.reset(token)


def _read_answer(response: Any, deadline: float, limit: int, shown_url: str, too_late: str) -> bytes:
    """The whole (decoded) body of the streamed ``response``, read by the ``deadline``: at most
    ``limit`` bytes, refused unread past that."""
    too_big = f"POST {shown_url}: the answer is larger than the limit of {limit} bytes"
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise OutboundError(f"{too_big} (Content-Length: {declared})")
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise OutboundError(too_big)
        if time.monotonic() > deadline:
            raise OutboundError(too_late)
        chunks.append(chunk)
    return b"".join(chunks)


def _bound_by_deadlines(client: Any) -> None:
    """Make every network read and write of ``client``'s connections wait at most until the
    deadline of the attempt under way (``_DEADLINE``): httpx's own timeouts bound each read alone,
    so an answer (its headers included) that arrives a byte at a time would never time out."""
    pool = getattr(getattr(client, "_transport", None), "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if backend is not None and not isinstance(backend, _DeadlineBackend):
        pool._network_backend = _DeadlineBackend(backend)  # httpx has no public way to hand httpcore one


def _remaining(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of the attempt's deadline; ``error`` when nothing is left."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the deadline of the whole attempt has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineBackend:
    """An httpcore network backend whose streams wait at most until the attempt's deadline."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> Any:
        import httpcore

        stream = self._backend.connect_tcp(
            host,
            port,
            timeout=_remaining(timeout, httpcore.ConnectTimeout),
            local_address=local_address,
            socket_options=socket_options,
        )
        return _DeadlineStream(stream)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise OSError("unix sockets are not used for outbound calls")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _DeadlineStream:
    """A connection's stream (httpcore's NetworkStream) whose reads and writes end at the deadline."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        import httpcore

        return self._stream.read(max_bytes, _remaining(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        import httpcore

        self._stream.write(buffer, _remaining(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> Any:
        import httpcore

        self._stream = self._stream.start_tls(
            ssl_context, server_hostname, _remaining(timeout, httpcore.ConnectTimeout)
        )
        return self

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)
