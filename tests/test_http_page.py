"""The queue page in a real browser: Debian's Chromium, headless, driven by
selenium through its ChromeDriver (tests/setup.sh installs both).

Find a message by recipient, open it, retry it; a subject holding <script>
is shown as text and runs nothing; the page fits a phone's width. The
screenshots of docs/ come from here: `SMTPGATE_SCREENSHOTS=docs python -m
pytest tests/test_http_page.py` writes them there (else to the test's
temporary directory).
"""

from __future__ import annotations

import os
import shutil

import pytest

from support import free_port
from http_support import http_daemon, wait_until

pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HOSTILE_SUBJECT = "<script>window.pwned = 1</script> & <b>bold</b>"


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def shot(driver, tmp_path, name: str) -> None:
    folder = os.environ.get("SMTPGATE_SCREENSHOTS") or str(tmp_path)
    assert driver.save_screenshot(os.path.join(folder, name))


def url(daemon, path: str = "/") -> str:
    return f"http://{daemon.http[0]}:{daemon.http[1]}{path}"


def send(daemon, to: str, subject: str) -> str:
    with daemon.client() as client:
        return client.send({"from": "shop@example.com", "to": [to], "subject": subject, "text": "hi"})


def test_find_open_and_retry_a_message_with_a_hostile_subject(make_daemon, upstream, browser, tmp_path):
    daemon = http_daemon(make_daemon, retry_base=60.0, retry_max=60.0)
    for n in range(12):
        upstream.script_rcpt(f"customer{n}@example.org", f"451 4.7.1 customer{n}: greylisted, try later")
    upstream.script_rcpt("find.me@example.org", "452 4.2.2 mailbox full", "452 4.2.2 mailbox still full")
    for n in range(12):
        send(daemon, f"customer{n}@example.org", f"Order {1000 + n} confirmation")
    for n in range(4):
        send(daemon, f"fine{n}@example.org", "Welcome")
    msg_id = send(daemon, "find.me@example.org", HOSTILE_SUBJECT)
    wait_until(lambda: daemon.client().status(msg_id)["attempts"] == 1
               and daemon.client().stats()["states"]["deferred"] == 13, what="13 deferred")

    browser.get(url(daemon))
    assert "deferred 13" in browser.find_element(By.CLASS_NAME, "counts").text
    assert browser.find_element(By.XPATH, "//meta[@http-equiv='refresh']")
    shot(browser, tmp_path, "http-queue-busy.png")

    box = browser.find_element(By.NAME, "q")
    box.send_keys("FIND.me")  # any case
    box.submit()
    wait_until(lambda: "Found for" in browser.page_source, what="the results")
    browser.find_element(By.LINK_TEXT, msg_id).click()
    wait_until(lambda: msg_id in browser.title, what="the message's page")

    subject = browser.find_element(By.XPATH, "//th[text()='Subject']/following-sibling::td")
    assert subject.text == HOSTILE_SUBJECT
    assert browser.execute_script("return window.pwned") is None
    assert not browser.find_elements(By.TAG_NAME, "b")
    assert "452 4.2.2 mailbox full" in browser.find_element(By.TAG_NAME, "body").text

    browser.find_element(By.XPATH, "//button[text()='Retry now']").click()
    wait_until(lambda: "Retried: due now." in browser.page_source, what="the notice")
    # Retried for real: the upstream gets a second attempt (and defers it again).
    wait_until(lambda: daemon.client().status(msg_id)["attempts"] == 2, what="the second attempt")
    assert daemon.client().status(msg_id)["recipients"][0]["reply"].startswith("452 4.2.2 mailbox still full")


def test_an_upstream_down_is_shown_with_its_reason_and_the_page_fits_a_phone(make_daemon, browser, tmp_path):
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    daemon = http_daemon(make_daemon, upstream=[nobody], upstream_probe_base=30.0, upstream_probe_max=60.0)
    for n in range(3):
        send(daemon, f"waiting{n}@example.org", "Your invoice")
    wait_until(lambda: (u := daemon.client().stats()["upstreams"]) and u[0]["state"] == "down", what="down")

    browser.set_window_size(1000, 700)
    browser.get(url(daemon))
    state = browser.find_element(By.CSS_SELECTOR, "span.down")
    assert state.text == "down"
    row = state.find_element(By.XPATH, "ancestor::tr").text
    assert nobody in row and "Connection refused" in row and "3 messages waiting" in row
    shot(browser, tmp_path, "http-upstream-down.png")

    browser.set_window_size(390, 844)  # a phone
    browser.get(url(daemon))
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    shot(browser, tmp_path, "http-phone.png")
