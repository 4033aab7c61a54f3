"""The page `lorakit serve` answers at `/`, in a real browser (Debian's headless Chromium driven
by Selenium): it lists the adapters, and its playground streams two adapters' answers to one
prompt side by side, each what the completions API gives for that adapter."""

from __future__ import annotations

import shutil

import pytest

from ..train.conftest import model_dirs  # noqa: F401  (fixture)
from .test_engine import adapters_dir, llama_adapters  # noqa: F401  (fixtures)
from .test_server import serve  # noqa: F401  (fixture)

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install selenium")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_the_page_lists_adapters_and_streams_two_answers_side_by_side(serve, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = serve()
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#adapters tbody tr")) == 4)  # base + a, b, c
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#adapters tbody tr")]
    assert rows[1].startswith("a ") and "LoRA" in rows[1] and "q_proj" in rows[2]
    picked = [e.get_attribute("value") for e in browser.find_elements(By.CSS_SELECTOR, ".pick:checked")]
    assert picked == ["a", "b"]
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("alice met bob in")
    limit = browser.find_element(By.ID, "max")
    limit.clear()
    limit.send_keys("8")
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: all(d.find_element(By.ID, f"out{i}").get_attribute("data-done") for i in (0, 1)))
    answers = [browser.find_element(By.ID, f"out{i}").text for i in (0, 1)]
    assert all(answers) and answers[0] != answers[1]
    assert answers == [server.text(name, "alice met bob in", 8).strip() for name in ("a", "b")]
    browser.save_screenshot(str(tmp_path / "page.png"))
