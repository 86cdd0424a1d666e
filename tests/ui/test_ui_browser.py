"""``dreamblend ui`` in a real headless browser: one blend on the toy model, the sweep, and an error.

Needs Chromium and its driver (Debian: ``apt-get install -y chromium chromium-driver``; ``.ci/run``
installs them) and selenium (``pip install -e ".[test]"``). The app is served in-process on a free port
and closed after the module; the screenshot of the whole page is left in the test's tmp_path.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator

import pytest
from PIL import Image

from dreamblend.ui.app import build_app

INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium"
BROWSER = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
if BROWSER is None or DRIVER is None:
    pytest.skip(f"no Chromium or chromedriver on PATH; install them: {INSTALL}", allow_module_level=True)
try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    pytest.skip(f"selenium is not installed; install it: {INSTALL}", allow_module_level=True)

# Generous: the machine may be busy; a 4-step toy blend takes a few seconds at one thread.
RUN_TIMEOUT = 300
LABELS = ("g", "e", "blend")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(toy_session) -> Iterator[str]:
    app = build_app(toy_session).queue()
    for attempt in range(3):  # another process may take the port between the probe and the bind
        port = _free_port()
        try:
            app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
            break
        except OSError:
            if attempt == 2:
                raise
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _status_after(browser: webdriver.Chrome, button: str, *endings: str) -> str:
    """Click ``button`` and wait until the status line is new and starts with one of ``endings``.

    The line left by the previous run (say "Stopped.") may already match ``endings``, so the wait
    also needs the text to differ from it: every test here follows a run with a different outcome.
    """
    status = browser.find_element(By.CSS_SELECTOR, "#status")
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, button).is_enabled())
    before = status.text
    browser.find_element(By.CSS_SELECTOR, button).click()

    def settled(_: webdriver.Chrome) -> str | None:
        text = status.text
        return text if text != before and text.startswith(endings) else None

    try:
        return WebDriverWait(browser, RUN_TIMEOUT).until(settled)
    except TimeoutException:
        pytest.fail(f"no new {endings} after {RUN_TIMEOUT} s; the status says {status.text!r}")


def _loaded_images(browser: webdriver.Chrome, selector: str) -> int:
    """How many images under ``selector`` have arrived and decoded (a broken one has no width)."""
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0)"
        ".length",
        f"{selector} img",
    )


def _open(browser: webdriver.Chrome, url: str) -> None:
    browser.get(url)
    WebDriverWait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#run"))


def test_the_page_blends_on_the_toy_model_and_shows_images_maps_scores_and_command(
    url, browser, toy_session, tmp_path
):
    _open(browser, url)
    status = _status_after(browser, "#run", "Done", "**Error", "Error", "Stopped")
    assert status.startswith("Done"), status
    for label in LABELS:
        WebDriverWait(browser, 60).until(lambda d, label=label: _loaded_images(d, f"#image-{label}") == 1)
    words = len(toy_session.config.defaults.words)
    WebDriverWait(browser, 60).until(lambda d: _loaded_images(d, "#maps") == 3 * words)
    captions = browser.find_element(By.CSS_SELECTOR, "#maps").text
    assert all(word in captions for word in toy_session.config.defaults.words), captions
    scores = browser.find_element(By.CSS_SELECTOR, "#scores").text
    assert all(name in scores for name in toy_session.config.metrics), scores
    command = browser.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value")
    assert command.startswith("dreamblend generate 'a sks cube") and "--seed 0" in command

    status = _status_after(browser, "#sweep", "Swept", "**Error", "Error", "Stopped")
    assert status == "Swept 5 alphas.", status
    WebDriverWait(browser, 60).until(lambda d: _loaded_images(d, "#strip") == 5)

    shot = tmp_path / "ui.png"
    browser.execute_script("window.scrollTo(0, 0)")
    browser.set_window_size(1400, browser.execute_script("return document.body.scrollHeight") + 140)
    assert browser.save_screenshot(str(shot))  # the whole page
    with Image.open(shot) as image:
        assert image.width >= 1000 and image.height >= 1000


def test_a_prompt_over_77_tokens_shows_its_error_in_the_page_and_the_page_stays_usable(url, browser):
    _open(browser, url)
    prompt = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
    prompt.clear()
    prompt.send_keys("a sks cube on the grass " * 16)
    status = _status_after(browser, "#run", "Done", "Error", "Stopped")
    assert "Error: the prompt is 98 tokens long, but the model reads at most 77" in status, status
    assert _loaded_images(browser, "#image-blend") == 0  # nothing was sampled

    prompt.clear()
    prompt.send_keys("a sks cube in the snow")
    assert _status_after(browser, "#run", "Done", "Error", "Stopped").startswith("Done")
    WebDriverWait(browser, 60).until(lambda d: _loaded_images(d, "#image-blend") == 1)


def _set_steps(browser: webdriver.Chrome, steps: int) -> None:
    field = browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(steps), Keys.TAB)  # the slider takes the number when the field loses focus


def test_stop_ends_a_long_run_and_the_next_run_works(url, browser):
    _open(browser, url)
    _set_steps(browser, 200)  # about a minute at one thread: long enough to be stopped mid-run
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    WebDriverWait(browser, RUN_TIMEOUT).until(
        lambda d: "sampling" in d.find_element(By.TAG_NAME, "body").text
    )
    browser.find_element(By.CSS_SELECTOR, "#stop").click()
    status = browser.find_element(By.CSS_SELECTOR, "#status")
    WebDriverWait(browser, RUN_TIMEOUT).until(lambda d: status.text.startswith(("Done", "Error", "Stopped")))
    assert status.text.startswith("Stopped"), status.text
    assert _loaded_images(browser, "#image-blend") == 0

    _set_steps(browser, 3)
    assert _status_after(browser, "#run", "Done", "Error", "Stopped").startswith("Done")
    command = browser.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value")
    assert "--steps 3 " in command, command
