"""The explorer in a real browser: time from start to a ready app, and from an interaction to the updated view.

    python benchmarks/explorer.py [RESULTS_DIR] [--rounds 10] [--starts 10]

Starts ``mechscope app`` (the command a user types, ``python -m mechscope app``) on a free port over RESULTS_DIR
(default demo_output, from ``bash run.sh demo``) ``--starts`` times, with headless Chromium (Debian's chromium and
chromium-driver, driven by selenium) already open, and times each start to the first latent dashboard drawn: the
median and its 95% confidence interval. Then times ``--rounds`` of each interaction and reports medians and maxima.
Goals: the app ready in under 5 s after start, every interaction under 1 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from harness import median_interval
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from mechscope.dashboards.layout import find_dashboards
from mechscope.dashboards.outputs import load_dashboards


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
    """Seconds until ``condition()`` holds (polled every 20 ms)."""
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout:
            raise TimeoutError("the view did not update")
        time.sleep(0.02)
    return time.perf_counter() - start


SETTLED = """return document.querySelector('[data-testid="stStatusWidget"]') === null
    && document.body.textContent.includes(arguments[0]);"""


def settled(driver: webdriver.Chrome, wanted: str) -> bool:
    """The page holds ``wanted`` and Streamlit has stopped running: one script call that reads ``textContent``
    (no layout), so polling it does not slow the page it measures."""
    try:
        return bool(driver.execute_script(SETTLED, wanted))
    except Exception:  # the page is being rebuilt; ask again
        return False


def click_button(driver: webdriver.Chrome, label_start: str) -> str:
    """Click the first button whose text starts with ``label_start``; return its text. Asks again while Streamlit
    replaces the page's elements."""
    for _ in range(50):
        try:
            for button in driver.find_elements(By.TAG_NAME, "button"):
                if button.text.startswith(label_start):
                    text = button.text
                    button.click()
                    return text
        except StaleElementReferenceException:
            pass
        time.sleep(0.05)
    raise LookupError(f"no button starting with {label_start!r}")


def pca_points(driver: webdriver.Chrome) -> list:
    """The PCA scatter's points, once plotly has drawn them (it can lag the page's text on a loaded machine)."""
    selector = ".js-plotly-plot .scatterlayer .trace .point"
    wait_until(lambda: bool(driver.find_elements(By.CSS_SELECTOR, selector)))
    return driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[0].find_elements(By.CSS_SELECTOR, selector[15:])


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).status == 200
    except OSError:
        return False


def start_app(root: Path, port: int) -> subprocess.Popen:
    """``mechscope app ROOT --port PORT`` in its own process group, so :func:`stop_app` ends all it started."""
    command = [sys.executable, "-m", "mechscope", "app", str(root), "--port", str(port)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_app(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=10)


def time_to_ready(driver: webdriver.Chrome, root: Path, latent: int, starts: int) -> tuple[list[float], list[float]]:
    """Seconds from ``mechscope app`` launched to its server answering, and to latent ``latent``'s dashboard drawn,
    once per start."""
    serving, ready = [], []
    for _ in range(starts):
        url = f"http://127.0.0.1:{(port := free_port())}"
        start = time.perf_counter()
        server = start_app(root, port)
        try:
            wait_until(lambda url=url: healthy(url))
            serving.append(time.perf_counter() - start)
            driver.get(f"{url}/?view=latent&latent={latent}")
            wait_until(lambda: settled(driver, f"Latent {latent} of"))
            ready.append(time.perf_counter() - start)
        finally:
            stop_app(server)
    return serving, ready


def report(name: str, times: list[float]) -> str:
    return f"{name}: median {statistics.median(times):.3f} s, max {max(times):.3f} s over {len(times)} (goal < 1 s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="demo_output")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds of each interaction")
    parser.add_argument("--starts", type=int, default=10, help="timed starts of the app")
    args = parser.parse_args()
    root = Path(args.results_dir).resolve()
    dash = load_dashboards(find_dashboards(root)[0])
    live = (dash.firing > 0).nonzero()[:, 0].tolist()

    driver = browser()
    lines = [f"load average (1/5/15 min) before the run: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    server = None
    try:
        serving, ready = time_to_ready(driver, root, live[0], args.starts)
        lines.append(f"server answering: {statistics.median(serving):.2f} s median after `mechscope app`")
        median, low, high = median_interval(ready)
        lines.append(
            f"explorer on {root}: ready {median:.2f} s after `mechscope app` (95% CI {low:.2f}-{high:.2f} s, "
            f"max {max(ready):.2f} s over {len(ready)} starts; goal < 5 s)"
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_app(root, port)
        wait_until(lambda: healthy(url))
        driver.get(f"{url}/?view=latent&latent={live[0]}")
        wait_until(lambda: settled(driver, f"Latent {live[0]} of"))
        time.sleep(1)  # let the page's last rerun (the URL written back) finish before typing

        typed = []
        for latent in live[1 : args.rounds + 1]:
            box = driver.find_element(By.CSS_SELECTOR, 'input[aria-label="latent"]')
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(str(latent), Keys.ENTER)
            typed.append(wait_until(lambda latent=latent: settled(driver, f"Latent {latent} of")))
            time.sleep(0.3)
        lines.append(report("latent dashboard, a latent typed -> its dashboard", typed))

        partners = []
        for _ in range(args.rounds):
            label = click_button(driver, "latent ")  # a co-occurring latent: "latent 12 · Jaccard 0.310"
            other = label.split()[1]
            partners.append(wait_until(lambda other=other: settled(driver, f"Latent {other} of")))
            time.sleep(0.3)
        lines.append(report("latent dashboard, a co-occurring latent clicked -> its dashboard", partners))

        driver.get(f"{url}/?view=cooc")  # the first hook, threshold, size and subgraph
        wait_until(lambda: settled(driver, "click a point of the PCA"))
        time.sleep(1)
        clicks = []
        for k in range(args.rounds):
            points = pca_points(driver)
            point = points[(k * 7) % len(points)]
            before = driver.execute_script("return new URL(window.location).searchParams.get('point')")
            ActionChains(driver).move_to_element(point).click().perform()

            def moved(before=before) -> bool:
                now = driver.execute_script("return new URL(window.location).searchParams.get('point')")
                return now is not None and now != before and settled(driver, "subgraph latents at this point")

            clicks.append(wait_until(moved))
            time.sleep(0.3)
        lines.append(report("co-occurrence, a PCA point clicked -> its bars, token, context and graph", clicks))

        start = time.perf_counter()
        driver.get(f"{url}/?view=inspector&prompt=The%20capital%20of%20France%20is")
        wait_until(lambda: settled(driver, "Attribution to a target token"), timeout=300)
        lines.append(f"prompt inspector first shown (loads the model once): {time.perf_counter() - start:.2f} s")
        ablations = []
        for k in range(args.rounds):
            box = driver.find_element(By.CSS_SELECTOR, 'input[aria-label="attention heads (LAYER:HEAD, ...)"]')
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(f"{k % 6}:{k % 3}", Keys.ENTER)  # another head each round: the numbers shown change
            shown = f"ablated heads: {k % 6}:{k % 3}"
            ablations.append(wait_until(lambda shown=shown: settled(driver, shown)))
            time.sleep(0.3)
        lines.append(report("prompt inspector, a head ablated -> logit, probability and top tokens", ablations))
    finally:
        driver.quit()
        if server is not None:
            stop_app(server)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
