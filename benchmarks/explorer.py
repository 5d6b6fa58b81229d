"""The explorer in a real browser: time from start to a ready app, and from an interaction to the updated view.

    python benchmarks/explorer.py [RESULTS_DIR] [--rounds 10]

Starts ``mechscope app`` on a free port over RESULTS_DIR (default demo_output, from ``bash run.sh demo``), drives
headless Chromium (Debian's chromium and chromium-driver) with selenium and reports medians and maxima. Goals: the
app ready in under 5 s after start, every interaction under 1 s.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from mechscope.apps.explorer.launch import RESULTS_ENV, app_command
from mechscope.dashboards.outputs import find_dashboards, load_dashboards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1500,1100", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> float:
    """Seconds until ``condition()`` holds (polled every 10 ms)."""
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout:
            raise TimeoutError("the view did not update")
        time.sleep(0.01)
    return time.perf_counter() - start


def page_text(driver: webdriver.Chrome) -> str:
    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except Exception:  # the page is being rebuilt; ask again
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="demo_output")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    root = Path(args.results_dir).resolve()
    dash = load_dashboards(find_dashboards(root)[0])
    live = (dash.firing > 0).nonzero()[:, 0].tolist()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    server = subprocess.Popen(app_command("127.0.0.1", port), env={**os.environ, RESULTS_ENV: str(root)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    driver = browser()
    try:

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).status == 200
            except OSError:
                return False

        wait_until(healthy)
        driver.get(f"{url}/?view=latent&latent={live[0]}")
        wait_until(lambda: f"Latent {live[0]} of" in page_text(driver))
        ready = time.perf_counter() - start

        times = []
        for latent in live[1 : args.rounds + 1]:
            box = driver.find_element(By.CSS_SELECTOR, 'input[aria-label="latent"]')
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(str(latent), Keys.ENTER)
            times.append(wait_until(lambda latent=latent: f"Latent {latent} of" in page_text(driver)))
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=10)
    print(f"explorer on {root}: ready {ready:.2f} s after start (goal < 5 s)")
    print(
        f"latent dashboard, new latent typed -> its dashboard shown: median {statistics.median(times):.3f} s, "
        f"max {max(times):.3f} s over {len(times)} (goal < 1 s)"
    )


if __name__ == "__main__":
    main()
