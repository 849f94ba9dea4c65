"""The operator console in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``).

Selenium drives the browser through ``/usr/bin/chromedriver`` against a real
``kvlog serve``: the page shows the store's stats, a key lookup shows the
value and its ETag and follows a change made by another process, a prefix
lookup lists the keys, and the browser logs no error. Set
``KVLOG_CONSOLE_SCREENSHOT=PATH`` to keep a screenshot (docs/console.png is
made so).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from http_helpers import PATIENCE, Served, kvlog, target_args

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.slow


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium and chromium-driver (.ci/run installs them)")
        pytest.skip(
            "no /usr/bin/chromium and /usr/bin/chromedriver: apt-get install chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_the_console_shows_stats_a_key_a_prefix_and_no_errors(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data = tmp_path / "data"
    dump = tmp_path / "orders.jsonl"
    orders = {
        f"order:{i:03d}": {"customer": f"c{i % 5}", "status": "paid", "total": i * 1.5} for i in range(40)
    }
    dump.write_text("".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in orders.items()))
    kvlog(target_args(data), "load", str(dump))
    kvlog(target_args(data), "put", "customer:7", '{"name": "Ada"}')

    with Served(target_args(data), log_dir=tmp_path) as server:
        wait = WebDriverWait(browser, PATIENCE)

        def text(element_id: str) -> str:
            return str(browser.find_element(By.ID, element_id).text)

        browser.get(server.url + "/")
        wait.until(lambda _: text("stats-entries") == "41")
        assert text("stats-codec") == "msgpack"
        assert "embedded log" in text("describe")
        rows = browser.find_elements(By.CSS_SELECTOR, "#lag-table tbody tr")
        assert [r.text.split() for r in rows] == [["0", "41", "41", "0"]]

        # A key: its value and ETag, then a change made by another process shows up by itself.
        box = browser.find_element(By.ID, "key-input")
        box.send_keys("order:007")
        browser.find_element(By.ID, "get-button").click()
        wait.until(lambda _: '"total": 10.5' in text("value"))
        etag = server.client.get("/v1/keys/order:007").headers["etag"]
        assert text("etag") == etag
        assert text("seen-at").startswith(tuple("0123456789"))  # a date, not the placeholder
        kvlog(target_args(data), "put", "order:007", '{"status": "refunded"}')
        wait.until(lambda _: "refunded" in text("value"))
        assert text("etag") != etag and "→" in text("changes")
        shot = os.environ.get("KVLOG_CONSOLE_SCREENSHOT")
        if shot:
            browser.get_screenshot_as_file(shot)

        # A prefix: the keys under it, in order.
        box.clear()
        box.send_keys("order:01")
        browser.find_element(By.ID, "scan-button").click()
        wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#scan-results tbody tr")) == 10)
        keys = [
            r.find_element(By.TAG_NAME, "a").text
            for r in browser.find_elements(By.CSS_SELECTOR, "#scan-results tbody tr")
        ]
        assert keys == [f"order:{i:03d}" for i in range(10, 20)]
        assert "10 key(s)" in text("scan-title")

        assert not browser.find_element(By.ID, "error").is_displayed()
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors


def test_the_console_asks_for_the_token_and_shows_the_refusal(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data = tmp_path / "data"
    kvlog(target_args(data), "put", "k", "1")
    with Served(target_args(data), log_dir=tmp_path, token="console-token") as server:
        wait = WebDriverWait(browser, PATIENCE)
        browser.get(server.url + "/")
        error = browser.find_element(By.ID, "error")
        wait.until(lambda _: "Bearer" in error.text)
        token = browser.find_element(By.ID, "token")
        token.send_keys("console-token")
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", token)
        wait.until(lambda _: browser.find_element(By.ID, "stats-entries").text == "1")
        wait.until(lambda _: not error.is_displayed())
