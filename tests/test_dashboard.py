"""The live dashboard at /dashboard, in a real headless Chromium (Debian's `chromium` with its
`chromedriver`, driven by selenium) against a real `bentoml serve` while requests run: the block
counts on the page agree with /metrics, hovering a block names its request, and nothing is loaded
from anywhere but the server. A screenshot is saved next to the test's temporary files."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import openai
import pytest

from bento_llm.testing import metric, scrape
from tests.shared_server import AUTH, KEY, NUM_KV_BLOCKS

pytestmark = pytest.mark.slow

NUM_BLOCKS = NUM_KV_BLOCKS
PREAMBLE = "You are a helpful assistant who answers every question with care and in full detail. " * 3
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000")  # fmt: skip


@pytest.fixture(scope="module")
def server(shared_server):
    """The server the server test modules share (tests/shared_server.py)."""
    return shared_server.get()


def test_the_page_is_open_and_its_data_needs_the_key(server):
    page = httpx.get(server.url + "/dashboard/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "https://" not in page.text and "http://" not in page.text  # no CDN: everything is served here
    assert httpx.get(server.url + "/dashboard/state").status_code == 401
    state = httpx.get(server.url + "/dashboard/state", headers=AUTH).json()
    values = scrape(server.url)
    assert len(state["kv"]["blocks"]) == metric(values, "bento_llm:kv_blocks_total") == NUM_BLOCKS
    assert set(state["kv"]["blocks"]) <= set("fcus") and state["kv"]["requests"] == []


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/setup installs them with apt-get)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _page_counts(browser) -> dict[str, int]:
    return {name: int(browser.find_element("id", f"n-{name}").text) for name in ("total", "free", "cached", "used", "shared")}


def _next_update(browser, after: int, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = browser.find_element("id", "updates").text
        if text.isdigit() and int(text) > after:
            return int(text)
        time.sleep(0.05)
    raise AssertionError(f"the page did not update: status {browser.find_element('id', 'status').text!r}")


def test_the_page_shows_the_kv_cache_live_as_metrics_count_it(server, tmp_path):
    browser = _browser()
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    stop = threading.Event()

    def traffic(i: int) -> None:  # long generations, so blocks are held while the page is read
        while not stop.is_set():  # a common preamble hits the prefix cache; n=2 shares its prompt's blocks
            sdk.completions.create(model="tiny", prompt=PREAMBLE + f" Request {i}: tell me a long story", max_tokens=400,
                                   n=2 if i == 0 else 1, temperature=0.8, seed=i, extra_body={"ignore_eos": True})  # fmt: skip

    threads = [threading.Thread(target=traffic, args=(i,), daemon=True) for i in range(3)]
    try:
        browser.get(server.url + "/dashboard/")
        browser.execute_script("sessionStorage.setItem('bento-llm-key', arguments[0])", KEY)
        browser.refresh()
        seen = _next_update(browser, 0)
        assert browser.find_element("id", "model").text == "tiny"
        for thread in threads:
            thread.start()
        # Blocks only grow while the requests run, so /metrics read between two page updates
        # lies between them; a request ending in between breaks that, so try again. On a fast CPU
        # (a Zen 4 VM) a 400-token request of this tiny model ends about every window, and 10
        # tries all failed once in the suite; the model's length leaves no room for longer ones.
        for _ in range(30):
            seen = _next_update(browser, seen)
            before = _page_counts(browser)
            used = metric(scrape(server.url), "bento_llm:kv_blocks_used")
            seen = _next_update(browser, seen)
            after = _page_counts(browser)
            in_use = (before["used"] + before["shared"], after["used"] + after["shared"])
            if 0 < in_use[0] <= used <= in_use[1]:
                break
        else:
            raise AssertionError(f"page {in_use} never bracketed /metrics {used}")
        for counts in (before, after):
            assert counts["total"] == NUM_BLOCKS == sum(counts[k] for k in ("free", "cached", "used", "shared"))
        assert int(browser.find_element("id", "n-running").text) >= 1

        # Hovering a block in use names the request holding it.
        state = httpx.get(server.url + "/dashboard/state", headers=AUTH).json()
        running = [r for r in state["kv"]["requests"] if r["blocks"]]
        block = running[0]["blocks"][0]
        grid = browser.find_element("id", "grid")
        per_row = int(grid.get_attribute("data-per-row"))
        x, y = (block % per_row) * 14 + 6, (block // per_row) * 14 + 6
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(browser).move_to_element_with_offset(grid, x - grid.size["width"] // 2, y - grid.size["height"] // 2).perform()
        tip = browser.find_element("id", "tip").text
        assert f"block {block}:" in tip and "cmpl-" in tip, tip

        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(name.startswith(server.url) for name in resources), resources
        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        print(f"dashboard screenshot: {shot}")
        assert shot.stat().st_size > 10_000
    finally:
        stop.set()
        browser.quit()
        for thread in threads:
            thread.join(timeout=120)
    # Every request done: the page and /metrics agree on an idle pool too.
    deadline = time.monotonic() + 30
    while metric(scrape(server.url), "bento_llm:kv_blocks_used") and time.monotonic() < deadline:
        time.sleep(0.1)
    state = httpx.get(server.url + "/dashboard/state", headers=AUTH).json()
    assert set(state["kv"]["blocks"]) <= set("fc") and state["kv"]["stats"]["num_running"] == 0
    assert state["history"] and max(p["tokens_per_s"] for p in state["history"]) > 0
