"""The dashboard in headless Chromium, against the live API on PostgreSQL.

Job progress is written through the worker's own queries by a simulated worker (see
simulate.py): what is under test is the page, its key handling and its polling.
``GRPO_UPDATE_SCREENSHOT=1`` also refreshes docs/dashboard.png."""

from __future__ import annotations

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
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1000"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")]


@pytest.fixture(scope="module")
def settings(make_database, tmp_path_factory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("dashboard"), database_url=make_database(), broker_url=REDIS_URL,
                    broker_key_prefix=f"grpo-test-{RUN_ID}:", queue=f"gpu-{RUN_ID}")


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
    dataset = api.post("/v1/datasets", files={"file": ("arith.jsonl", jsonl(arithmetic_rows()), "application/jsonl")})
    spec = job_spec(dataset.json()["id"], "Qwen/Qwen2.5-0.5B-Instruct", name=name,
                    hyperparameters={"max_steps": max_steps})
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


def test_a_finished_jobs_curves_samples_checkpoints_and_events(browser, server, api, settings, key, tmp_path) -> None:
    job_id = new_job(api, "arith-grpo", max_steps=30)
    SimulatedWorker(settings, job_id).run(30, checkpoint_every=10)

    browser.get(f"{server}/?key={key}&poll_ms=300#{job_id}")
    wait_for(lambda: points(browser, "reward") == 30, timeout=15, what="the reward curve")
    path = css(browser, "#chart-reward path.line")[0].get_attribute("d")
    assert path.startswith("M") and path.count("L") == 29
    assert {"kl", "loss", "reward_std"} <= {c.get_attribute("data-metric") for c in css(browser, ".chart")}
    assert css(browser, "#job-status")[0].text == "succeeded"
    assert css(browser, "#job-step")[0].text.startswith("step 30 / 30")
    assert f"{job_id}" in css(browser, "#jobs tbody tr.selected")[0].text
    wait_for(lambda: len(css(browser, "#samples tbody tr")) == 2, timeout=10, what="the samples")
    assert "<think>30 plus 0</think> 30" in css(browser, "#samples tbody")[0].text
    assert [li.text.split(" · ")[0] for li in css(browser, "#checkpoints li")] == ["step 10", "step 20", "step 30"]
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
    wait_for(lambda: points(browser, "reward") == 1, timeout=15, what="the first step")
    assert css(browser, "#job-status")[0].text == "running"

    for step in range(2, 6):
        worker.step(step)
        wait_for(lambda s=step: css(browser, "#job-step")[0].get_attribute("data-step") == str(s), timeout=10,
                 what=f"step {step} on the page")
    assert points(browser, "reward") == 5 and css(browser, "#chart-reward path.line")[0].get_attribute("d").count("L") == 4
    worker.finish()
    wait_for(lambda: css(browser, "#job-status")[0].text == "succeeded", timeout=10, what="the final status")


def test_a_lora_job_offers_its_adapter_and_merged_model(browser, server, api, settings) -> None:
    job_id = new_job(api, "lora", max_steps=2)
    SimulatedWorker(settings, job_id).claim().finish()
    make_checkpoint(settings, job_id, 2, kind="adapter")
    merged = merged_dir(settings.job_dir(job_id), 2)  # as the worker leaves it when a LoRA job succeeds
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"w" * 64)

    browser.get(f"{server}/?poll_ms=200#{job_id}")
    wait_for(lambda: css(browser, "#checkpoints li"), timeout=15, what="the checkpoint")
    [item] = css(browser, "#checkpoints li")
    assert [b.text for b in item.find_elements("css selector", "button")] == ["adapter", "merged model"]
    assert f"grpo jobs download {job_id} --step 2 [--merged]" in item.text


def test_without_a_valid_key_the_page_asks_for_one(browser, server, settings) -> None:
    browser.get(f"{server}/?key=grpo_not-a-key")
    wait_for(lambda: css(browser, "#key-form")[0].is_displayed(), timeout=10, what="the key form")
    assert "invalid API key" in css(browser, "#key-error")[0].text
    css(browser, "#key-input")[0].send_keys(api_key(settings, owner="bob"))
    css(browser, "#key-form button")[0].click()
    wait_for(lambda: css(browser, "#app")[0].is_displayed(), timeout=10, what="the dashboard")
    wait_for(lambda: css(browser, "#jobs-empty")[0].is_displayed(), timeout=10, what="bob's empty job list")
