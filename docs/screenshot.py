"""The README's dashboard screenshot, taken from a real run: the demo's job.

    make demo                      # trains, and leaves its service's data under .demo/service
    .venv/bin/python docs/screenshot.py [--data-dir .demo] [--out docs/dashboard.png]

Serves the demo's embedded data again (API only: ``GRPO_DATA_DIR`` points uvicorn at its SQLite
database and artifacts), makes a key with the code behind ``grpo keys create``, opens the
dashboard on the newest job in headless Chromium (Debian's ``chromium`` and ``chromium-driver``)
and saves the page.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo.__main__ import create_api_key, free_port  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def wait_for(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".demo")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    service_dir = args.data_dir / "service"
    if not (service_dir / "grpo.db").exists():
        raise SystemExit(f"no demo data under {service_dir}: run `make demo` first")

    port = free_port()
    env = {**os.environ, "GRPO_DATA_DIR": str(service_dir)}
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{base}/readyz").status_code in (200, 503)
            except httpx.TransportError:
                return False

        wait_for(up, "the API")
        key = create_api_key(service_dir)
        jobs = httpx.get(f"{base}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).json()["data"]
        if not jobs:
            raise SystemExit("the demo's service has no job: run `make demo` first")
        job = jobs[0]

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        with tempfile.TemporaryDirectory() as profile:
            for flag in (
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--window-size=1280,1000",
                "--disable-background-networking",
                f"--user-data-dir={profile}",
            ):
                options.add_argument(flag)
            browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
            try:
                browser.get(f"{base}/?key={key}#{job['id']}")

                def drawn() -> bool:
                    charts = browser.find_elements("css selector", "#chart-reward")
                    return bool(charts) and int(charts[0].get_attribute("data-points") or 0) == job["step"]

                wait_for(drawn, "the reward curve")
                wait_for(lambda: browser.find_elements("css selector", "#samples tbody tr"), "the samples")
                time.sleep(0.5)
                height = browser.execute_script("return document.body.scrollHeight")
                browser.set_window_size(1280, min(max(height + 40, 1000), 2400))
                browser.save_screenshot(str(args.out))
            finally:
                browser.quit()
        print(f"{args.out}: job {job['id']} ({job['status']}, step {job['step']}/{job['max_steps']})")
    finally:
        api.terminate()
        api.wait(timeout=30)


if __name__ == "__main__":
    main()
