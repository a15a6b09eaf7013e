"""The web page of `halo serve`, in a real headless browser (Debian's chromium and its
driver, through selenium) against a real server over real local workers: the page loads and
shows the workers, a chat message gets a streamed reply (the same text as the API gives), a
killed worker shows up as taken over, and the cluster keeps answering.

`python -m tests.test_web docs/images/web.png` drives the same page over four workers in
relaxed mode and writes the screenshot in the docs.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from halollm.runtime.local import LocalWorkers
from tests.test_serve import serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
KEY = "web-test-key"
QUESTION = "Name three colours."

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason=(
        "needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver; `scripts/setup.sh --test` installs them when run as root)")),
]


def browser() -> webdriver.Chrome:
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1440,960", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    opts.binary_location = str(CHROMIUM)
    return webdriver.Chrome(service=Service(str(DRIVER)), options=opts)


def wait_for(driver: webdriver.Chrome, what: str, check: Callable[[], object],
             timeout: float = 90) -> object:
    """Wait until check() is truthy; on timeout, fail saying what did not happen."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda _d: check())
    except Exception as exc:  # noqa: BLE001 -- TimeoutException, with the page's state
        pytest.fail(f"the page never showed {what} (devices: {states(driver)}, events: "
                    f"{texts(driver, '#events li')}): {exc!r}")


def states(driver: webdriver.Chrome) -> dict[str, str]:
    """Each device row's state, read in one go (the rows are redrawn twice a second)."""
    return driver.execute_script(
        "const out = {}; for (const r of document.querySelectorAll('tr.device')) "
        "out[r.dataset.name] = r.dataset.state; return out;")


def texts(driver: webdriver.Chrome, selector: str) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.textContent)",
        selector)


def chat(driver: webdriver.Chrome, text: str, max_tokens: int, temperature: float) -> dict:
    """Type a message, send it with Enter, wait for the reply to finish; the reply's text
    (without its footer), its state and how many streamed pieces built it."""
    for field, value in (("max-tokens", max_tokens), ("temperature", temperature)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys(text)
    prompt.send_keys(Keys.ENTER)

    def finished() -> object:
        replies = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        if len(replies) <= before or replies[-1].get_attribute("data-state") == "streaming":
            return None
        return replies[-1]

    reply = wait_for(driver, "a finished reply", finished, timeout=180)
    body = driver.execute_script(
        "return Array.from(arguments[0].childNodes).filter(n => n.nodeType === 3)"
        ".map(n => n.textContent).join('')", reply)
    return {"text": body, "state": reply.get_attribute("data-state"),  # type: ignore[union-attr]
            "chunks": int(reply.get_attribute("data-chunks") or 0)}  # type: ignore[union-attr]


def drive(n_workers: int, shot: Path, mode: str) -> dict:
    """The whole story over n_workers local workers; returns what was seen."""
    seen: dict = {}
    with LocalWorkers(n_workers, KEY, threads=1) as lw:
        workers = ",".join(f"{h}:{p}" for h, p in lw.addresses)
        names = [f"{h}:{p}" for h, p in lw.addresses]
        with serving("--workers", workers, "--key", KEY, "--predictor", "none",
                     "--sync", mode) as base:
            driver = browser()
            try:
                driver.get(base + "/")
                wait_for(driver, "every worker alive", lambda: all(
                    states(driver).get(n) == "alive" for n in names))
                seen["title"] = driver.title
                seen["states_before"] = states(driver)
                seen["reply"] = chat(driver, QUESTION, max_tokens=24, temperature=0)
                api = httpx.post(base + "/v1/chat/completions", timeout=120, json={
                    "model": "default", "max_tokens": 24, "temperature": 0,
                    "messages": [{"role": "user", "content": QUESTION}]}).json()
                seen["api_text"] = api["choices"][0]["message"]["content"]
                seen["chart_note"] = texts(driver, "#latency-note")[0]
                seen["tps"] = texts(driver, "#tps")[0]
                lw.kill(0)
                wait_for(driver, f"worker {names[0]} taken over", lambda: states(driver).get(
                    names[0]) == "taken over" and texts(driver, "#events li[data-kind="
                                                                "'takeover']"))
                seen["states_after"] = states(driver)
                seen["events"] = texts(driver, "#events li")
                seen["second"] = chat(driver, "And three animals?", max_tokens=24,
                                      temperature=0.7)
                time.sleep(1.0)  # one more status push, so the picture is current
                driver.save_screenshot(str(shot))
            finally:
                driver.quit()
    return seen


def test_web_page_chats_and_shows_the_cluster_live(tmp_path):
    seen = drive(2, tmp_path / "web.png", mode="strict")
    assert seen["title"] == "HALO"
    before = seen["states_before"]
    assert len(before) == 3 and list(before.values()).count("alive") == 3  # coordinator + 2
    reply = seen["reply"]
    assert reply["state"] == "done" and reply["text"].strip()
    assert reply["chunks"] > 1  # it streamed in, piece by piece
    assert reply["text"] == seen["api_text"]  # strict sync, greedy: exactly the API's text
    assert "decoded tokens" in seen["chart_note"] and seen["tps"] not in ("", "–")
    after = list(seen["states_after"].values())
    assert after.count("taken over") == 1 and after.count("alive") == 2
    assert any("took over" in e for e in seen["events"])
    assert seen["second"]["state"] == "done" and seen["second"]["text"].strip()
    assert (tmp_path / "web.png").stat().st_size > 10_000


if __name__ == "__main__":  # the screenshot in the docs: four workers, relaxed sync
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/web.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(drive(4, out, mode="relaxed"))
