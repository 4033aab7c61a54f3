"""The README's screenshot of `lorakit serve`'s page: SmolLM2-135M with two adapters trained
briefly on E2E (one LoRA, one DoRA, so the page shows both and their loss curves), the
playground run on one meaning representation, captured by headless Chromium.

    python benchmarks/page_screenshot.py          # writes docs/serve_page.png (needs ../shared/data/e2e)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT.parent / "shared" / "data" / "e2e"
PROMPT = "name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate], area[riverside]"


def train(out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "lorakit", "train", "--model", "smollm2-135m", "--task", "causal-lm",
                    "--data", str(E2E / "train.txt"), "--eval-data", str(E2E / "test.txt"), "--max-steps", "24",
                    "--batch-size", "8", "--max-length", "96", "--max-train-examples", "192",
                    "--max-eval-examples", "16", "--bf16", "--eval-every", "8", "--output", str(out), "--quiet",
                    *extra], check=True)  # fmt: skip


def main() -> None:
    if not E2E.is_dir() or not shutil.which("chromium"):
        print("skip: needs ../shared/data/e2e and Debian's chromium + chromium-driver")
        return
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sys.path.insert(0, str(ROOT))
    from lorakit.serve import Engine, EngineConfig

    work = Path(tempfile.mkdtemp())
    train(work / "e2e-lora", "--lr", "1e-3")
    train(work / "e2e-dora", "--lr", "1e-3", "--dora")
    for run in work.iterdir():  # the adapters dir holds adapters only: drop the checkpoints
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    from tests.serve.test_server import Server  # uvicorn in a thread, as the tests run it

    engine = Engine.from_pretrained("smollm2-135m", work, served_name="smollm2-135m",
                                    config=EngineConfig(watch_interval_s=0))  # fmt: skip
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,720"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        with Server(engine) as server:
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#adapters tbody tr")) == 3)
            box = driver.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(PROMPT + "\n")
            driver.find_element(By.ID, "run").click()
            wait.until(lambda d: all(d.find_element(By.ID, f"out{i}").get_attribute("data-done") for i in (0, 1)))
            out = ROOT / "docs" / "serve_page.png"
            driver.save_screenshot(str(out))
            print(f"wrote {out}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
