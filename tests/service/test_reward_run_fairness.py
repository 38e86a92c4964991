"""POST /v1/rewards/run shares its slots between owners, stops at its time limit, and stops
when its client hangs up: a dry-run's sandboxes are killed and its HTTP calls cut."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import psutil

from api.main import create_app
from tests.service.factories import api_key, bearer, wait_for
from tests.service.http_stub import LoopbackEndpoint
from tests.service.live import serve

TRIVIAL = [{"type": "exact_match"}]


class HoldingEndpoint(LoopbackEndpoint):
    """An ``http`` reward's endpoint on loopback that holds every request until ``release``d. A
    request is known by its first completion: ``arrived`` lists them in order, ``dropped`` those
    whose caller closed the connection while it was held."""

    def __init__(self) -> None:
        self.arrived: list[str] = []
        self.dropped: list[str] = []
        self.released = threading.Event()
        super().__init__()

    def answer(self, request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, dict[str, Any]] | None:
        completions = json.loads(body)["completions"]
        tag = completions[0]
        self.arrived.append(tag)
        while not self.released.wait(0.05):
            readable, _, _ = select.select([request.connection], [], [], 0)
            if readable and not request.connection.recv(1, socket.MSG_PEEK):  # end of stream: hung up
                self.dropped.append(tag)
                return None
        return 200, {"rewards": [1.0] * len(completions)}

    def reward(self) -> dict[str, Any]:
        """A reward that waits on this endpoint far longer than any test runs."""
        return {"type": "http", "url": self.url, "retries": 0, "timeout_s": 600}

    def close(self) -> None:
        self.released.set()
        super().close()


def dry_run(
    reward: list[dict[str, Any]], completion: str, row: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "reward": reward,
        "samples": [{"completion": completion, "row": row if row is not None else {"answer": "1"}}],
    }


def test_one_owners_slow_dry_runs_do_not_delay_another_owners(client, settings) -> None:
    settings.allow_private_hosts = ["127.0.0.1"]
    settings.reward_runs_at_once, settings.reward_runs_per_key, settings.reward_run_queue_per_key = 2, 1, 1
    bob = bearer(api_key(settings, owner="bob"))
    with (
        ThreadPoolExecutor(max_workers=5) as pool,
        HoldingEndpoint() as endpoint,
    ):  # released before the pool waits
        alice: list[Future] = [
            pool.submit(client.post, "/v1/rewards/run", json=dry_run([endpoint.reward()], f"alice-{i}"))
            for i in range(4)
        ]
        wait_for(
            lambda: sum(future.done() for future in alice) >= 2,
            timeout=60,
            what="alice's requests past her line (one scoring, one waiting) to be refused",
        )
        refused = [future.result() for future in alice if future.done()]
        assert [response.status_code for response in refused] == [429, 429], [r.text for r in refused]
        assert all(
            r.json()["error"]["code"] == "too_many_reward_runs" and r.headers["retry-after"] for r in refused
        )
        assert "GRPO_REWARD_RUNS_PER_KEY" in refused[0].json()["error"]["message"]
        held = [future for future in alice if not future.done()]
        wait_for(lambda: endpoint.arrived, timeout=60, what="alice's first dry-run to reach the endpoint")

        # Two slots: alice holds one and waits for it in her own line; bob's dry-run takes the other.
        theirs = pool.submit(client.post, "/v1/rewards/run", json=dry_run(TRIVIAL, "1"), headers=bob)
        response = theirs.result(timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["data"][0]["total"] == 1.0
        assert len(endpoint.arrived) == 1 and not any(future.done() for future in held)

        endpoint.released.set()  # alice's first ends, then her second scores
        assert [future.result(timeout=60).status_code for future in held] == [200, 200]
        assert len(endpoint.arrived) == 2


def sandbox_processes() -> list[psutil.Process]:
    """This process's sandboxes (the API runs in it): their launchers and what those started."""
    launchers = [
        child for child in psutil.Process().children() if "sandbox_launcher.py" in " ".join(child.cmdline())
    ]
    return [process for launcher in launchers for process in [launcher, *launcher.children(recursive=True)]]


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_dry_run_past_its_time_is_stopped_with_its_sandbox(client, settings) -> None:
    settings.reward_run_timeout_s = 6.0
    spin = "```python\nwhile True:\n    pass\n```"
    reward = [{"type": "exact_match"}, {"type": "code_tests", "timeout_s": 60}]
    with ThreadPoolExecutor(max_workers=1) as pool:
        request = pool.submit(
            client.post,
            "/v1/rewards/run",
            json=dry_run(reward, spin, {"answer": "1", "tests": ["assert True"]}),
        )
        running = wait_for(
            lambda: (
                [p for p in sandbox_processes() if "/sandbox/main.py" in " ".join(p.cmdline())]
                and sandbox_processes()
            ),
            timeout=60,
            what="the program to run in its sandbox",
        )
        response = request.result(timeout=120)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "reward_run_timed_out" and error["param"] == "reward[1]"
    assert "GRPO_REWARD_RUN_TIMEOUT_S" in error["message"] and "code_tests" in error["message"]
    assert all(gone(process) for process in running), [p for p in running if not gone(p)]


def test_hanging_up_stops_the_dry_run_and_frees_its_slot(settings) -> None:
    settings.allow_private_hosts = ["127.0.0.1"]
    settings.reward_runs_per_key = 1
    key = bearer(api_key(settings))
    with HoldingEndpoint() as endpoint, serve(create_app(settings, send=[].append)) as base:
        port = int(base.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request(
            "POST",
            "/v1/rewards/run",
            json.dumps(dry_run([endpoint.reward()], "hung-up")),
            headers={**key, "Content-Type": "application/json"},
        )
        wait_for(lambda: endpoint.arrived, timeout=60, what="the dry-run to reach the endpoint")
        connection.close()  # the client hangs up while the endpoint holds the call

        wait_for(lambda: endpoint.dropped, timeout=60, what="the API to cut its call to the endpoint")
        assert endpoint.dropped == ["hung-up"]
        response = httpx.post(f"{base}/v1/rewards/run", json=dry_run(TRIVIAL, "1"), headers=key, timeout=60)
        assert response.status_code == 200, response.text  # alice's one slot is hers again
