"""The ``http`` reward: POST the batch to the user's scoring endpoint.

Request ``{"prompts": [...], "completions": [...], "rows": [...]}``; expected answer
``{"rewards": [float, ...]}``, one per completion. Anything else fails the whole batch.
"""

from __future__ import annotations

import math
import time
from typing import Any

from trainer.config import ConfigError
from trainer.rewards.base import Option, RewardError, RewardType, Scores

BACKOFF_S = 0.25  # doubled after each retry


class HttpReward:
    def __init__(self, spec: dict[str, Any]):
        import httpx

        self.url = spec["url"]
        self.retries = spec["retries"]
        self.client = httpx.Client(timeout=spec["timeout_s"], headers=spec["headers"] or {})

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> Scores:
        response = self._post({"prompts": prompts, "completions": completions, "rows": rows})
        try:
            rewards = response.json()["rewards"]
        except (ValueError, KeyError, TypeError):
            raise RewardError(f"POST {self.url}: expected a JSON object {{\"rewards\": [numbers]}}, got "
                              f"{response.text[:200]!r}") from None
        if not isinstance(rewards, list) or len(rewards) != len(completions):
            count = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
            raise RewardError(f"POST {self.url}: expected {len(completions)} rewards, one per completion, "
                              f"got {count}")
        for index, value in enumerate(rewards):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise RewardError(f"POST {self.url}: rewards[{index}] is {value!r}, not a finite number")
        return [float(value) for value in rewards]

    def _post(self, payload: dict[str, Any]):
        """The 2xx response; retries connection errors and 5xx answers, not timeouts."""
        import httpx

        for attempt in range(self.retries + 1):
            last_try = attempt == self.retries
            try:
                response = self.client.post(self.url, json=payload)
            except httpx.TimeoutException:
                raise RewardError(f"POST {self.url}: no answer within {self.client.timeout.read:g} s "
                                  "(raise timeout_s or make the endpoint faster)") from None
            except httpx.TransportError as exc:
                if last_try:
                    raise RewardError(f"POST {self.url}: cannot connect ({exc})") from None
            else:
                if response.is_success:
                    return response
                if response.status_code < 500 or last_try:
                    raise RewardError(f"POST {self.url}: answered HTTP {response.status_code}: "
                                      f"{response.text[:200]!r}")
            time.sleep(BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self.client.close()


def _check_http(spec: dict[str, Any], param: str) -> None:
    if not spec["url"].startswith(("http://", "https://")):
        raise ConfigError(f"{param}.url", f"must be an http:// or https:// URL, got {spec['url']!r}")


HTTP = RewardType(
    summary="rewards from POSTing the batch to url, which answers {\"rewards\": [...]}",
    options={
        "url": Option("string", example='"https://scorer.example.com/score"'),
        "timeout_s": Option("number", 30.0, above=0),
        "headers": Option("headers", None),
        "retries": Option("integer", 2, minimum=0),
    },
    check=_check_http,
    build=lambda spec, **_: HttpReward(spec),
)
