"""The explorer in a real browser: `mechscope app`'s server on a free localhost port, headless Chromium (Debian's
chromium and chromium-driver) driven by selenium. Fails on a Streamlit exception box or a browser console error;
saves a screenshot of each view in $MECHSCOPE_SCREENSHOTS (default: the test's tmp dir)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from mechscope import HookedModel
from mechscope.apps.explorer.figures import category_order
from mechscope.dashboards.outputs import load_dashboards
from mechscope.sae import SAE
from mechscope.sae.attribution import ablate, attribute_latents
from tests.apps.test_explorer import HOOK, first_pca, results  # noqa: F401 (the fixture)

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(results):  # noqa: F811
    port = free_port()
    command = [sys.executable, "-m", "mechscope", "app", str(results), "--port", str(port)]  # what a user types
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited: {proc.stdout.read().decode() if proc.stdout else ''}") from None
            time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("the app did not answer on /_stcore/health within 60 s")
    yield url
    proc.terminate()  # the app stops on SIGTERM (generous timeout: the machine may be loaded)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        pytest.fail(
            "the browser test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1500,1100",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def screenshots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("MECHSCOPE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def open_view(driver, url: str | None, wait_for: str, timeout: float = 90) -> str:
    """Load ``url`` (None: stay) and wait until the page's text holds ``wait_for`` and Streamlit has stopped
    running."""
    if url is not None:
        driver.get(url)

    def ready(d) -> bool:
        body = d.find_element(By.TAG_NAME, "body").text
        running = d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
        return wait_for in body and not running

    WebDriverWait(driver, timeout).until(ready)
    time.sleep(0.5)
    return driver.find_element(By.TAG_NAME, "body").text


def assert_clean(driver) -> None:
    boxes = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert not boxes, [b.text for b in boxes]
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_every_view_in_a_real_browser(server, browser, results, tmp_path_factory):  # noqa: F811
    shots = screenshots(tmp_path_factory)
    dash = load_dashboards(results / "dashboards")
    latent = int(dash.firing.argmax())
    text = open_view(browser, f"{server}/?view=latent&latent={latent}", f"Latent {latent} of {dash.d_sae}")
    assert "Top activations" in text and "promoted tokens" in text
    assert f"{float(dash.top.values[latent, 0]):.2f}" in text
    assert_clean(browser)
    browser.save_screenshot(str(shots / "latent_dashboard.png"))
    for other in [int(i) for i in (dash.firing > 0).nonzero()[:3, 0] if int(i) != latent]:
        # each edit in turn reaches the page (a widget whose default follows the URL used to drop every other one)
        box = browser.find_element(By.CSS_SELECTOR, 'input[aria-label="latent"]')
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(other), Keys.ENTER)
        open_view(browser, None, f"Latent {other} of {dash.d_sae}")
        assert f"latent={other}" in browser.current_url
    partner = next(b for b in browser.find_elements(By.TAG_NAME, "button") if "Jaccard" in b.text)
    other = int(partner.text.split()[1])
    partner.click()
    open_view(browser, None, f"Latent {other} of {dash.d_sae}")
    assert_clean(browser)

    model = HookedModel.from_pretrained(str(results / "model"))
    sae = SAE.load(results / "sae")
    tokens = model.to_tokens("hello world")
    logits = model(tokens)[0, -1].detach()
    target = int(logits.softmax(-1).argmax())
    active = attribute_latents(model, sae, tokens, target, hook_name=HOOK).latents.tolist()[:2]
    want = ablate(model, tokens, target, sae=sae, latents=active, hook_name=HOOK)
    url = f"{server}/?view=inspector&prompt=hello%20world&ablate={','.join(map(str, active))}"
    text = open_view(browser, url, "target probability")
    assert f"{want.ablated_logit:.3f}" in text and f"{want.ablated_prob:.4f}" in text
    assert_clean(browser)
    browser.save_screenshot(str(shots / "prompt_inspector.png"))

    size, subs = first_pca(results)
    sid = min(subs)
    url = f"{server}/?view=cooc&hook={HOOK}&t=0_0&size={size}&sg={sid}"
    text = open_view(browser, url, "click a point of the PCA")
    assert f"subgraph {sid}" in text
    assert_clean(browser)
    browser.save_screenshot(str(shots / "cooccurrence.png"))
    # click the last trace's first point: with one trace per colour, its row is the trace's own customdata
    pca_chart = browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[0]  # the first figure of the view
    point = pca_chart.find_elements(By.CSS_SELECTOR, ".scatterlayer .trace")[-1].find_element(By.CSS_SELECTOR, ".point")
    ActionChains(browser).move_to_element(point).click().perform()
    text = open_view(browser, None, "subgraph latents at this point")
    clicked = int(browser.execute_script("return new URL(window.location).searchParams.get('point')"))
    pca = subs[sid].pca
    colours = [_colour(pca, i) for i in range(len(subs[sid].tokens))]
    last_colour = sorted(set(colours), key=category_order)[-1]  # the figure's trace order
    rows = [i for i, c in enumerate(colours) if c == last_colour]
    assert clicked == rows[0]  # the point clicked, not its index inside its trace
    assert f"token {subs[sid].tokens[clicked]!r}" in text
    assert subs[sid].contexts[clicked].split("|")[0].strip()[:20] in text
    assert_clean(browser)
    browser.save_screenshot(str(shots / "cooccurrence_point.png"))


def _colour(pca, i: int) -> str:
    return str(int(pca.top_index[i])) if pca.top_in_subgraph[i] else "outside"
