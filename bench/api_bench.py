"""API benchmark: throughput and latency of the job endpoints beside a bare FastAPI endpoint,
and the time from POST /v1/jobs to ``running`` with the Redis broker.

    .venv/bin/python bench/api_bench.py [--concurrency 64] [--seconds 5] [--jobs 5] [--client wrk|httpx]

Needs PostgreSQL and Redis (GRPO_TEST_POSTGRES_URL, GRPO_TEST_REDIS_URL as in the tests). It
makes a throwaway database, serves each app with one uvicorn process on loopback, and drives
them with ``wrk`` (C, one thread: it takes little of the cores it shares with the server; Debian
package ``wrk``) or, without it, one asyncio httpx client (which costs the machine about as much
CPU per request as the server does). Prints figures; writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.db import transaction  # noqa: E402
from jobs.migrate import upgrade  # noqa: E402
from jobs.models import Job  # noqa: E402
from jobs.queries import append_metrics  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from tests.service.conftest import ADMIN_URL, REDIS_URL  # noqa: E402
from tests.service.factories import (  # noqa: E402
    WorkerProcess,
    api_key,
    bearer,
    forget_broker_keys,
    free_port,
    job_spec,
    settings_env,
    upload,
    wait_for,
)

BARE_APP = """
from fastapi import FastAPI
app = FastAPI()

@app.get("/async")
async def bare_async():
    return {"id": "job_0", "status": "running"}

@app.get("/sync")
def bare_sync():
    return {"id": "job_0", "status": "running"}
"""
METRICS = {
    name: 0.5
    for name in (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "clip_ratio",
        "loss",
        "grad_norm",
        "learning_rate",
        "completion_length",
        "completion_length/min",
        "completion_length/max",
        "truncated_ratio",
        "entropy",
        "time/generate",
        "time/reward",
        "time/train",
        "tokens_per_second",
        "rewards/exact_match",
    )
}


@contextmanager
def serve(app: str, env: dict[str, str], cwd: Path, port: int):
    """One uvicorn process serving ``app``; yields its base URL and pid."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=cwd,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(base), timeout=30, what=f"{app} to start", interval=0.2)
        yield base, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: unlike wall time, not inflated by other load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _up(base: str) -> bool:
    try:
        return httpx.get(base + "/openapi.json").status_code == 200
    except httpx.TransportError:
        return False


async def load(
    url: str, *, concurrency: int, seconds: float, max_requests: int, pid: int, headers: dict[str, str]
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30, headers=headers) as client:
        await client.get(url)  # warm the route

        async def one_client() -> None:
            nonlocal errors
            while time.perf_counter() < deadline and len(latencies) < max_requests:
                start = time.perf_counter()
                response = await client.get(url)
                latencies.append(time.perf_counter() - start)
                errors += response.status_code != 200

        start, cpu_start = time.perf_counter(), cpu_seconds(pid)
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu_start
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "n": len(latencies),
        "errors": errors,
        "cpu_ms": cpu / len(latencies) * 1000,
    }


def load_wrk(
    url: str, *, concurrency: int, seconds: float, pid: int, headers: dict[str, str]
) -> dict[str, float]:
    """The same figures from ``wrk --latency`` (its percentiles are corrected for coordinated omission)."""
    command = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "30s",
    ]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    httpx.get(url, headers=headers)  # warm the route
    cpu_start = cpu_seconds(pid)
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pid) - cpu_start

    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    percentiles = dict(re.findall(r"^\s*(50|99)%\s+(\S+)\s*$", out, re.M))
    if len(percentiles) < 2:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    n = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": ms(percentiles["50"]),
        "p99": ms(percentiles["99"]),
        "n": n,
        "cpu_ms": cpu / max(n, 1) * 1000,
        "errors": (int(non_2xx.group(1)) if non_2xx else 0)
        + (sum(map(int, errors.groups())) if errors else 0),
    }


def make_database() -> tuple[str, str]:
    name = f"grpo_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return name, ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def writing(database_url: str, job_id: str, per_second: float) -> Iterator[None]:
    """A worker's writes to the job meanwhile (heartbeats, steps): each one drops its cached answers."""
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as connection:
            while not stop.wait(1 / per_second):
                connection.execute("UPDATE jobs SET heartbeat_at = now() WHERE id = %s", (job_id,))

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join()


def bench_reads(settings: Settings, args: argparse.Namespace, work: Path) -> None:
    (work / "bare_app.py").write_text(BARE_APP)
    env = settings_env(settings)
    uncached_env = {**env, "GRPO_RESPONSE_CACHE_MB": "0"}
    headers = bearer(api_key(settings))
    with (
        serve("api.main:app", env, REPO, free_port()) as (base, api_pid),
        httpx.Client(base_url=base, headers=headers) as client,
    ):
        dataset_id = upload(client).json()["id"]
        job_id = client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"]
        with transaction(settings.database_url) as session:
            for step in range(1, args.steps + 1):
                append_metrics(session=session, job_id=job_id, step=step, metrics=METRICS)
            session.get(Job, job_id).step = args.steps  # so the job shows its latest metrics
        with (
            serve("bare_app:app", env, work, free_port()) as (bare, bare_pid),
            serve("api.main:app", uncached_env, REPO, free_port()) as (uncached, uncached_pid),
        ):
            show, poll, everything = (
                f"/v1/jobs/{job_id}",
                f"/v1/jobs/{job_id}/metrics?after_step={args.steps - 1}",
                f"/v1/jobs/{job_id}/metrics",
            )
            no_writes = contextlib.nullcontext
            every_50_ms = partial(writing, settings.database_url, job_id, 20)
            targets = {  # name: (url, server pid, what runs meanwhile)
                "bare FastAPI, async def": (f"{bare}/async", bare_pid, no_writes),
                "bare FastAPI, def (threadpool)": (f"{bare}/sync", bare_pid, no_writes),
                "GET /v1/jobs/{id}": (base + show, api_pid, no_writes),
                "GET /v1/jobs/{id}/metrics?after_step= (1 new)": (base + poll, api_pid, no_writes),
                f"GET /v1/jobs/{{id}}/metrics (all {args.steps} steps)": (
                    base + everything,
                    api_pid,
                    no_writes,
                ),
                "GET /v1/jobs/{id}, the job written 20 times/s": (base + show, api_pid, every_50_ms),
                "GET /v1/jobs/{id}, cache off": (uncached + show, uncached_pid, no_writes),
                "GET /v1/jobs/{id}/metrics?after_step=, cache off": (
                    uncached + poll,
                    uncached_pid,
                    no_writes,
                ),
            }
            print(
                f"\n{args.concurrency} concurrent clients ({args.client}), {args.seconds:g} s each run; "
                "server CPU = the uvicorn process's CPU time per request"
            )
            print(
                f"{'endpoint':52} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
                f"{'CPU ms':>7} {'n':>6} {'errors':>6}"
            )
            for name, (url, pid, meanwhile) in targets.items():
                with meanwhile():
                    if args.client == "wrk":
                        r = load_wrk(
                            url, concurrency=args.concurrency, seconds=args.seconds, pid=pid, headers=headers
                        )
                    else:
                        r = asyncio.run(
                            load(
                                url,
                                concurrency=args.concurrency,
                                seconds=args.seconds,
                                max_requests=args.requests,
                                pid=pid,
                                headers=headers,
                            )
                        )
                print(
                    f"{name:52} {r['rps']:7.0f} {r['p50']:7.1f} {r['p99']:7.1f} {r['cpu_ms']:7.2f} "
                    f"{r['n']:6d} {r['errors']:6d}"
                )
        client.post(f"/v1/jobs/{job_id}/cancel")  # it is queued: the next part's worker must not run it first


def bench_time_to_running(settings: Settings, args: argparse.Namespace, work: Path) -> None:
    from trainer.tiny import make_tiny_model

    model = make_tiny_model(
        work / "models" / "tiny", hidden_size=32, num_heads=2
    )  # <data_dir>/models: allowed
    worker = WorkerProcess(settings).start()
    try:
        with (
            serve("api.main:app", settings_env(settings), REPO, free_port()) as (base, _),
            httpx.Client(base_url=base, headers=bearer(api_key(settings))) as client,
        ):
            dataset_id = upload(client).json()["id"]
            spec = job_spec(dataset_id, str(model), hyperparameters={"max_steps": 1})
            seen, recorded = [], []
            for attempt in range(args.jobs + 1):  # the first one (untimed) waits for the worker to start
                start = time.perf_counter()
                job_id = client.post("/v1/jobs", json=spec).json()["id"]
                job = wait_for(
                    partial(_status, client, job_id, until_not="queued"),
                    timeout=120,
                    what="running",
                    interval=0.005,
                )
                if attempt:
                    seen.append(time.perf_counter() - start)
                    recorded.append(_ts(job["started_at"]) - _ts(job["created_at"]))
                wait_for(
                    partial(_status, client, job_id, until_not="running"),
                    timeout=120,
                    what="the job to end",
                    interval=0.1,
                )
                time.sleep(3)  # the pool forks a fresh process after each job: let it be idle again
        print(f"\nPOST /v1/jobs → running (Redis broker, one idle worker, {args.jobs} jobs)")
        for name, values in (
            ("seen by the client (POST sent → GET says running)", seen),
            ("recorded (created_at → started_at)", recorded),
        ):
            ms = sorted(v * 1000 for v in values)
            print(
                f"  {name:52} median {statistics.median(ms):6.0f} ms   min {ms[0]:6.0f}   max {ms[-1]:6.0f}"
            )
            print(f"  {'':52} each, in order: {' '.join(f'{v * 1000:.0f}' for v in values)}")
    finally:
        worker.stop()
        if os.environ.get("BENCH_WORKER_LOG"):
            print(worker.log_path.read_text()[-int(os.environ["BENCH_WORKER_LOG"]) :])


def _status(client: httpx.Client, job_id: str, *, until_not: str) -> dict | None:
    job = client.get(f"/v1/jobs/{job_id}").json()
    return job if job["status"] != until_not else None


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=200, help="metrics rows of the benchmarked job")
    parser.add_argument("--jobs", type=int, default=5, help="jobs timed from POST to running (0: skip)")
    parser.add_argument("--no-reads", dest="reads", action="store_false", help="skip the read endpoints")
    parser.add_argument(
        "--client",
        choices=("wrk", "httpx"),
        default="wrk" if shutil.which("wrk") else "httpx",
        help="the load generator (default: wrk when installed)",
    )
    args = parser.parse_args()
    name, url = make_database()
    try:
        upgrade(url)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            tag = uuid.uuid4().hex[:8]
            # Rate limiting stays on (its cost is part of every request) at a rate this load never hits.
            settings = Settings(
                data_dir=work,
                database_url=url,
                broker_url=REDIS_URL,
                broker_key_prefix=f"grpo-bench-{tag}:",
                queue=f"gpu-bench-{tag}",
                rate_limit_per_s=1e9,
                rate_limit_burst=10**9,
            )
            try:
                if args.reads:
                    bench_reads(settings, args, work)
                if args.jobs:
                    bench_time_to_running(settings, args, work)
            finally:
                forget_broker_keys(settings)
    finally:
        drop_database(name)


if __name__ == "__main__":
    main()
