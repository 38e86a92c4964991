"""The dashboard in headless Chromium, against the live API on PostgreSQL.

Job progress is written through the worker's own queries by a simulated worker (see
simulate.py): what is under test is the page, its key handling and its polling.
``GRPO_UPDATE_SCREENSHOT=1`` also refreshes docs/dashboard.png."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.main import create_app
from jobs.artifacts import merged_dir
from jobs.settings import Settings
from tests.service.conftest import REDIS_URL
from tests.service.factories import (
    ROOT,
    RUN_ID,
    api_key,
    arithmetic_rows,
    bearer,
    job_spec,
    jsonl,
    make_checkpoint,
    wait_for,
)
from tests.service.live import serve
from tests.service.simulate import SimulatedWorker

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# How long the page may take to show a change: it only guards a hang (chromium on a loaded 2-core
# machine has taken more than 15 s to render a job's first step).
PAGE_S = 60.0
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def settings(make_database, tmp_path_factory) -> Settings:
    return Settings(
        data_dir=tmp_path_factory.mktemp("dashboard"),
        database_url=make_database(),
        broker_url=REDIS_URL,
        broker_key_prefix=f"grpo-test-{RUN_ID}:",
        queue=f"gpu-{RUN_ID}",
    )


@pytest.fixture(scope="module")
def server(settings) -> Iterator[str]:
    with serve(create_app(settings, send=lambda job_id: None)) as url:  # the simulated worker needs no broker
        yield url


@pytest.fixture(scope="module")
def key(settings) -> str:
    return api_key(settings)


@pytest.fixture(scope="module")
def api(server, key) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers=bearer(key)) as client:
        yield client


def new_job(api: httpx.Client, name: str, max_steps: int) -> str:
    dataset = api.post(
        "/v1/datasets", files={"file": ("arith.jsonl", jsonl(arithmetic_rows()), "application/jsonl")}
    )
    spec = job_spec(
        dataset.json()["id"],
        "Qwen/Qwen2.5-0.5B-Instruct",
        name=name,
        hyperparameters={"max_steps": max_steps},
    )
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def css(browser, selector: str) -> list:
    return browser.find_elements("css selector", selector)


def points(browser, metric: str) -> int:
    charts = css(browser, f"#chart-{metric}")
    return int(charts[0].get_attribute("data-points") or 0) if charts else 0


def test_a_finished_jobs_curves_samples_checkpoints_and_events(
    browser, server, api, settings, key, tmp_path
) -> None:
    job_id = new_job(api, "arith-grpo", max_steps=30)
    SimulatedWorker(settings, job_id).run(30, checkpoint_every=10)

    browser.get(f"{server}/?key={key}&poll_ms=300#{job_id}")
    wait_for(lambda: points(browser, "reward") == 30, timeout=PAGE_S, what="the reward curve")
    path = css(browser, "#chart-reward path.line")[0].get_attribute("d")
    assert path.startswith("M") and path.count("L") == 29
    assert {"kl", "loss", "reward_std"} <= {c.get_attribute("data-metric") for c in css(browser, ".chart")}
    assert css(browser, "#job-status")[0].text == "succeeded"
    assert css(browser, "#job-step")[0].text.startswith("step 30 / 30")
    assert f"{job_id}" in css(browser, "#jobs tbody tr.selected")[0].text
    wait_for(lambda: len(css(browser, "#samples tbody tr")) == 2, timeout=PAGE_S, what="the samples")
    assert "<think>30 plus 0</think> 30" in css(browser, "#samples tbody")[0].text
    assert [li.text.split(" · ")[0] for li in css(browser, "#checkpoints li")] == [
        "step 10",
        "step 20",
        "step 30",
    ]
    assert "succeeded" in css(browser, "#events")[0].text

    assert "key=" not in browser.current_url  # the secret left the address bar for local storage
    assert browser.execute_script("return localStorage.getItem('grpo_api_key')") == key
    screenshot = tmp_path / "dashboard.png"
    browser.set_window_size(1280, 1500)  # tall enough for the samples and checkpoints
    browser.save_screenshot(str(screenshot))
    if os.environ.get("GRPO_UPDATE_SCREENSHOT"):
        shutil.copy(screenshot, ROOT / "docs" / "dashboard.png")


def test_a_running_jobs_page_follows_its_progress(browser, server, api, settings) -> None:
    job_id = new_job(api, "live", max_steps=20)
    worker = SimulatedWorker(settings, job_id).claim()
    worker.step(1)
    browser.get(f"{server}/?poll_ms=200#{job_id}")  # the key is remembered
    wait_for(lambda: points(browser, "reward") == 1, timeout=PAGE_S, what="the first step")
    assert css(browser, "#job-status")[0].text == "running"

    for step in range(2, 6):
        worker.step(step)
        wait_for(
            lambda s=step: css(browser, "#job-step")[0].get_attribute("data-step") == str(s),
            timeout=PAGE_S,
            what=f"step {step} on the page",
        )
    assert (
        points(browser, "reward") == 5
        and css(browser, "#chart-reward path.line")[0].get_attribute("d").count("L") == 4
    )
    worker.finish()
    wait_for(
        lambda: css(browser, "#job-status")[0].text == "succeeded", timeout=PAGE_S, what="the final status"
    )


def test_a_lora_job_offers_its_adapter_and_merged_model(browser, server, api, settings) -> None:
    job_id = new_job(api, "lora", max_steps=2)
    SimulatedWorker(settings, job_id).claim().finish()
    make_checkpoint(settings, job_id, 2, kind="adapter")
    merged = merged_dir(settings.job_dir(job_id), 2)  # as the worker leaves it when a LoRA job succeeds
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"w" * 64)

    browser.get(f"{server}/?poll_ms=200#{job_id}")
    wait_for(lambda: css(browser, "#checkpoints li"), timeout=PAGE_S, what="the checkpoint")
    [item] = css(browser, "#checkpoints li")
    assert [b.text for b in item.find_elements("css selector", "button")] == ["adapter", "merged model"]
    assert f"grpo jobs download {job_id} --step 2 [--merged]" in item.text


def test_without_a_valid_key_the_page_asks_for_one(browser, server, settings) -> None:
    browser.get(f"{server}/?key=grpo_not-a-key")
    wait_for(lambda: css(browser, "#key-form")[0].is_displayed(), timeout=PAGE_S, what="the key form")
    assert "invalid API key" in css(browser, "#key-error")[0].text
    css(browser, "#key-input")[0].send_keys(api_key(settings, owner="bob"))
    css(browser, "#key-form button")[0].click()
    wait_for(lambda: css(browser, "#app")[0].is_displayed(), timeout=PAGE_S, what="the dashboard")
    wait_for(
        lambda: css(browser, "#jobs-empty")[0].is_displayed(), timeout=PAGE_S, what="bob's empty job list"
    )


# What each element's box is, read in the page: [left, top, right, bottom, line boxes, overflows].
BOXES = """
return Array.from(document.querySelectorAll(arguments[0])).map((node) => {
  const r = node.getBoundingClientRect();
  return [r.left, r.top, r.right, r.bottom, node.getClientRects().length,
          node.scrollWidth > node.clientWidth + 1, node.textContent];
});"""


def boxes(browser, selector: str) -> list[list]:
    return browser.execute_script(BOXES, selector)


def inside(box: list, outer: list) -> bool:
    return (
        outer[0] - 0.5 <= box[0]
        and box[2] <= outer[2] + 0.5
        and outer[1] - 0.5 <= box[1]
        and box[3] <= outer[3] + 0.5
    )


def test_event_numbers_job_ids_and_chart_axes_are_readable(
    browser, server, api, settings, key, tmp_path
) -> None:
    """Event numbers past 9 were clipped, a job id wrapped over three lines, and no chart had axes."""
    job_id = new_job(api, "readable", max_steps=12)
    SimulatedWorker(settings, job_id).run(12, checkpoint_every=1)  # 12 checkpoint events, 14 or more in all
    browser.set_window_size(1280, 1000)
    browser.get(f"{server}/?key={key}&poll_ms=300#{job_id}")
    wait_for(
        lambda: points(browser, "reward") == 12 and len(css(browser, "#events li")) >= 14,
        timeout=PAGE_S,
        what="the curves and the events",
    )

    numbers = boxes(browser, "#events li .n")
    assert [n[6] for n in numbers] == [str(i) for i in range(1, len(numbers) + 1)]
    [events] = boxes(browser, "#events")
    for number in numbers[9:]:  # 10, 11, ...: wholly inside the list's width (it scrolls down), not cut
        assert events[0] - 0.5 <= number[0] and number[2] <= events[2] + 0.5 and not number[5], (
            number,
            events,
        )

    [panel] = boxes(browser, "#jobs-panel")
    assert not panel[5], panel  # the jobs table fits its panel: no scrolling sideways
    for box in boxes(browser, "#jobs tbody .id"):
        assert box[4] == 1 and box[3] - box[1] < 20, box  # one line
        assert box[6].startswith("job_") and len(box[6]) == 28

    for chart in css(browser, "#charts .chart"):
        metric = chart.get_attribute("data-metric")
        [outer] = boxes(browser, f"#{chart.get_attribute('id')}")
        y_ticks = boxes(browser, f"#{chart.get_attribute('id')} .ticks.y .tick")
        x_ticks = boxes(browser, f"#{chart.get_attribute('id')} .ticks.x .tick")
        titles = [t[6] for t in boxes(browser, f"#{chart.get_attribute('id')} .title")]
        assert titles == [metric, "step"], (metric, titles)
        assert len(x_ticks) >= 2 and len(y_ticks) >= (1 if metric == "learning_rate" else 2), (
            metric,
            y_ticks,
            x_ticks,
        )
        assert [t[6] for t in x_ticks] == sorted((t[6] for t in x_ticks), key=int)  # steps, left to right
        assert all(a[2] < b[0] for a, b in itertools.pairwise(x_ticks)), (
            metric,
            x_ticks,
        )  # apart, no overlap
        assert all(a[1] > b[3] for a, b in itertools.pairwise(y_ticks)), (
            metric,
            y_ticks,
        )  # rising up the axis
        assert all(t[6] and inside(t, outer) for t in y_ticks + x_ticks), (metric, outer, y_ticks, x_ticks)
    assert [t[6] for t in boxes(browser, "#chart-reward .ticks.x .tick")] == ["2", "4", "6", "8", "10", "12"]
    browser.save_screenshot(str(tmp_path / "top.png"))
    browser.set_window_size(1280, 2000)
    browser.execute_script(
        "const e = document.querySelector('#events'); e.scrollTop = e.scrollHeight; "
        "window.scrollTo(0, document.body.scrollHeight);"
    )
    browser.save_screenshot(str(tmp_path / "readable.png"))
    if os.environ.get("GRPO_SCREENSHOT_DIR"):
        for name in ("top.png", "readable.png"):
            shutil.copy(tmp_path / name, Path(os.environ["GRPO_SCREENSHOT_DIR"]) / name)


def test_ticked_jobs_overlay_their_curves_in_one_chart(browser, server, api, settings, key) -> None:
    first, second, third = (
        new_job(api, name, max_steps=steps)
        for name, steps in (("compare-a", 8), ("compare-b", 12), ("compare-c", 4))
    )
    for job_id, steps in ((first, 8), (second, 12), (third, 4)):
        SimulatedWorker(settings, job_id).run(steps)
    browser.get(f"{server}/?key={key}&poll_ms=300#{third}")
    wait_for(lambda: points(browser, "reward") == 4, timeout=PAGE_S, what="the third job's page")
    assert css(browser, "#compare")[0].is_displayed() is False

    for job_id in (first, second):
        tick(browser, job_id)
    wait_for(lambda: len(overlay(browser)["series"]) == 2, timeout=PAGE_S, what="two series")
    shown = overlay(browser)
    assert {job_id: points for job_id, (points, _, _) in shown["series"].items()} == {first: 8, second: 12}
    assert [shown["series"][first][1].count("L"), shown["series"][second][1].count("L")] == [7, 11]
    assert shown["series"][first][2] != shown["series"][second][2]  # two colours
    assert len(shown["legend"]) == 2 and "compare-a" in shown["legend"][0] and first in shown["legend"][0]
    assert "compare-b" in shown["legend"][1] and shown["metric"] == "reward"
    assert (
        shown["x_ticks"][0] == "2" and shown["x_ticks"][-1] == "12"
    )  # one step axis for both: the longer job's
    assert browser.current_url.endswith(f"#{third}")  # ticking a job does not open it

    tick(browser, first)
    wait_for(lambda: list(overlay(browser)["series"]) == [second], timeout=PAGE_S, what="one series left")
    assert len(overlay(browser)["legend"]) == 1
    tick(browser, second)
    wait_for(lambda: not css(browser, "#compare")[0].is_displayed(), timeout=PAGE_S, what="the chart hidden")


def tick(browser, job_id: str) -> None:
    """Click a job's compare box (in the page: the list is redrawn every few seconds)."""
    browser.execute_script(
        f"document.querySelector('#jobs tbody tr[data-job=\"{job_id}\"] input.compare').click()"
    )


# The overlay as the page draws it, read in one go (it is redrawn while it is polled).
OVERLAY = """
return {
  series: Object.fromEntries(Array.from(document.querySelectorAll('#compare-chart path.series')).map((p) =>
    [p.dataset.job, [Number(p.dataset.points), p.getAttribute('d'), getComputedStyle(p).stroke]])),
  legend: Array.from(document.querySelectorAll('#compare-legend li')).map((li) => li.textContent),
  metric: document.querySelector('#compare-metric').value,
  x_ticks: Array.from(document.querySelectorAll('#compare-chart .ticks.x .tick')).map((t) => t.textContent),
};"""


def overlay(browser) -> dict:
    return browser.execute_script(OVERLAY)


def test_checkpoints_show_their_eval_figures_and_the_best(browser, server, api, settings, key) -> None:
    from jobs.db import transaction
    from jobs.queries import record_evaluation

    job_id = new_job(api, "evaluated", max_steps=2)
    SimulatedWorker(settings, job_id).claim().finish()
    for step, reward in ((1, 0.75), (2, 0.5)):  # as the worker records them: checkpoint, then its evaluation
        make_checkpoint(settings, job_id, step)
        with transaction(settings.database_url) as session:
            record_evaluation(
                session=session,
                job_id=job_id,
                step=step,
                best_step=1,
                figures={"reward": reward, "rewards/exact_match": reward, "pass@1": 0.5, "pass@4": 0.9},
            )

    browser.get(f"{server}/?key={key}&poll_ms=200#{job_id}")
    wait_for(lambda: len(css(browser, "#checkpoints li")) == 2, timeout=PAGE_S, what="the checkpoints")
    best, last = css(browser, "#checkpoints li")
    assert "eval reward 0.75 · pass@1 0.5 · pass@4 0.9" in best.text and "exact_match" not in best.text
    assert [s.text for s in best.find_elements("css selector", "strong")] == ["best"]
    assert "eval reward 0.5 ·" in last.text and last.find_elements("css selector", "strong") == []


def test_a_metric_reported_only_at_checkpoints_draws_one_joined_line(
    browser, server, api, settings, key
) -> None:
    from jobs.db import transaction
    from jobs.queries import append_metrics
    from tests.service.simulate import metrics_at

    job_id = new_job(api, "sparse-eval", max_steps=6)
    worker = SimulatedWorker(settings, job_id).claim()
    for step in range(1, 7):
        worker.step(step)
        if step % 2 == 0:  # as the trainer reports evaluation: at checkpoint steps only
            with transaction(settings.database_url) as session:
                metrics = {**metrics_at(step), "eval/reward": step / 10}
                append_metrics(session=session, job_id=job_id, step=step, metrics=metrics)
    worker.finish()

    browser.get(f"{server}/?key={key}&poll_ms=200#{job_id}")
    wait_for(lambda: points(browser, "eval_reward") == 3, timeout=PAGE_S, what="the eval curve")
    path = css(browser, "#chart-eval_reward path.line")[0].get_attribute("d")
    assert path.count("M") == 1 and path.count("L") == 2, path  # steps 2, 4, 6 joined, not three lone dots
