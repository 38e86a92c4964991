"""Prometheus metrics: request counts and latencies by route, and jobs by status."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.db import Database
from jobs.models import Job, JobStatus


class JobsByStatus(Collector):
    """Read at scrape time, so every API replica reports the same, current numbers."""

    def __init__(self, db: Database):
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("grpo_jobs", "Jobs by status", labels=["status"])
        with self.db.transaction() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        for status in JobStatus:
            gauge.add_metric([status.value], counts.get(status.value, 0))
        yield gauge


class RequestMetrics:
    """Pure ASGI middleware (no per-request task or body buffering, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry):
        self.app = app
        self.requests = Counter(
            "grpo_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "grpo_http_request_seconds",
            "Time to the response's first byte",
            ["method", "route"],
            registry=registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.series: dict[
            tuple[str, str, int], tuple[Any, Any]
        ] = {}  # (method, route, status) -> its two series

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def send_and_observe(message: Message) -> None:
            if message["type"] == "http.response.start":
                labels = (
                    scope["method"],
                    getattr(scope.get("route"), "path", "unmatched"),
                    message["status"],
                )
                series = self.series.get(labels)
                if series is None:  # labels() costs microseconds a request: each series is looked up once
                    series = self.series[labels] = (
                        self.latency.labels(*labels[:2]),
                        self.requests.labels(*labels[:2], str(labels[2])),
                    )
                series[0].observe(time.perf_counter() - start)
                series[1].inc()
            await send(message)

        await self.app(scope, receive, send_and_observe)
