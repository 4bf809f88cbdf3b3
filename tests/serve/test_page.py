"""The page at ``/`` in a real browser: Debian's headless Chromium driven by Selenium (chromedriver
from Debian too; nothing is downloaded). A prompt typed into the form runs, its row shows live
progress, the finished video plays in the page, and a bad size shows the server's message."""

import os

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="the page test drives Chromium with selenium")
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
        "--window-size=1200,700",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)  # fmt: skip
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_runs_a_prompt_shows_progress_and_plays_the_video(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _engine = server
    browser.get(url + "/")
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "size").get_attribute("value") == "96x64")
    browser.find_element(By.NAME, "prompt").send_keys("a fox typed into the page")
    steps = browser.find_element(By.NAME, "steps")
    steps.clear()
    steps.send_keys("150")  # long enough to be seen running
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    def running(driver):  # a row whose bar is between 0 and 100 while its status says in_progress
        return driver.execute_script(
            "return [...document.querySelectorAll('#jobs tr')].some(r => r.dataset.status === 'in_progress' && "
            "r.querySelector('progress').value > 0 && r.querySelector('progress').value < 100)"
        )

    WebDriverWait(browser, 30, poll_frequency=0.1).until(running)
    shots = os.environ.get("SERVE_PAGE_SCREENSHOTS", str(tmp_path))  # the note's screenshots: =DIR pytest ...
    browser.save_screenshot(os.path.join(shots, "serve_page_running.png"))
    playing = ("const v = document.querySelector('#jobs tr video'); "
               "return v && v.readyState >= 2 ? [v.videoWidth, v.videoHeight] : null")  # fmt: skip
    size = WebDriverWait(browser, 60, poll_frequency=0.2).until(lambda d: d.execute_script(playing))
    assert size == [96, 64]  # decoded by the browser: the MP4 plays in the page
    row = browser.find_element(By.CSS_SELECTOR, "#jobs tr")
    assert "a fox typed into the page" in row.text and "completed" in row.text and "100%" in row.text
    browser.save_screenshot(os.path.join(shots, "serve_page_done.png"))

    size_box = browser.find_element(By.ID, "size")
    size_box.clear()
    size_box.send_keys("abc")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 10).until(lambda d: "WIDTHxHEIGHT" in d.find_element(By.ID, "message").text)
