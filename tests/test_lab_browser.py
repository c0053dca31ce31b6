"""rlpt lab in headless Chromium (Debian's chromium + chromium-driver, installed by `make sysdeps`), driven by
Selenium through /usr/bin/chromedriver (no Selenium Manager download): every page loads with no console error,
moving a knob changes the result, a run page shows its curves. Screenshots go to the test's tmp folder (and to
$RLPT_LAB_SHOTS when set: `RLPT_LAB_SHOTS=docs/img pytest tests/test_lab_browser.py` refreshes docs/lab.md's)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
CHROMEDRIVER = "/usr/bin/chromedriver"
if not (os.path.exists(CHROMEDRIVER) and (shutil.which("chromium") or os.path.exists("/usr/bin/chromium"))):
    pytest.skip("Debian's chromium and chromium-driver are not installed (make sysdeps)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from rlpt.lab.app import create_app  # noqa: E402
from rlpt.lab.lessons import LESSONS  # noqa: E402

SHOTS = {"20": "lab_kv.png", "10": "lab_ppo_clip.png", "18a": "lab_signal.png"}


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("lab_screenshots")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn
    runs = tmp_path_factory.mktemp("runs")
    (runs / "grpo_demo").mkdir()
    rows = [{"step": s, "reward/mean": 0.3 + 0.5 * s / 30, "acc/heldout": 0.2 + 0.6 * s / 30, "loss/kl": 0.002 * s,
             "entropy/mean": 1.2 - 0.02 * s, "clip/frac": 0.01 * (s % 5), "time/rollout": 1.2, "time/ref": 0.1,
             "time/train": 0.4, "time/sync": 0.05} for s in range(31)]
    (runs / "grpo_demo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(runs), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", runs
    srv.should_exit = True
    t.join(10)


@pytest.fixture(scope="module")
def driver():
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1000",
              "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def save(driver, shots: Path, name: str, docs: bool = True) -> None:
    driver.save_screenshot(str(shots / name))
    out = os.environ.get("RLPT_LAB_SHOTS")
    if out and docs:
        Path(out).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(out) / name))


def test_every_page_loads_without_console_errors(server, driver, shots):
    server, _ = server
    pages = ["/", "/runs", "/runs/grpo_demo"] + [f"/lesson/{lesson.slug}" for lesson in LESSONS]
    bad = {}
    for path in pages:
        driver.get(server + path)
        assert driver.find_element(By.TAG_NAME, "h1").text, path
        errs = errors(driver)
        if errs:
            bad[path] = errs
        slug = path.rsplit("/", 1)[-1]
        if path.startswith("/lesson/") and slug in SHOTS:
            save(driver, shots, SHOTS[slug])
        if path == "/runs/grpo_demo":
            assert len(driver.find_elements(By.CSS_SELECTOR, "#curves svg")) >= 5
            save(driver, shots, "lab_runs.png")
    assert not bad
    assert (shots / "lab_kv.png").stat().st_size > 10_000


def kpi(driver, name: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'[data-kpi="{name}"]').text


def move(driver, name: str, value) -> None:
    """Set a range input's value and fire the input event, as dragging it does."""
    el = driver.find_element(By.NAME, name)
    driver.execute_script("arguments[0].value = arguments[1];"
                          "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", el, str(value))


@pytest.mark.parametrize("slug,knob,value,name,before,after", [
    ("20", "batch", 64, "KV total", "8.0 GiB", "16.0 GiB"),
    ("22b", "k", 32, "straggler tax", "402%", "533%"),
    ("11", "r1", 1, "A₀", "+0.866", "+0.500"),
    ("06", "sync_every", 20, "frac clipped", "0.0%", "88.5%"),             # a simulation: a background job
    ("21", "long_frac", 0, "static / continuous", "1.67×", "1.00×"),        # the real engine, three runs
])
def test_moving_a_knob_changes_the_result(server, driver, shots, slug, knob, value, name, before, after):
    server, _ = server
    driver.get(f"{server}/lesson/{slug}")
    assert kpi(driver, name) == before
    old = driver.find_element(By.ID, "result").get_attribute("innerHTML")
    move(driver, knob, value)
    WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "result").get_attribute("innerHTML") != old)
    assert kpi(driver, name) == after
    assert driver.find_element(By.CSS_SELECTOR, "output").text   # the knob's value is shown beside it
    assert not errors(driver)
    save(driver, shots, f"moved_{slug}.png", docs=False)


def test_a_checkbox_flips_the_verdict(server, driver):
    server, _ = server
    driver.get(f"{server}/lesson/22")
    assert kpi(driver, "fits in 80 GB") == "yes"
    driver.find_element(By.NAME, "checkpoint").click()
    WebDriverWait(driver, 15).until(lambda d: kpi(d, "fits in 80 GB") == "no")
    assert kpi(driver, "train / GPU") == "153.2 GB"
    assert not errors(driver)


def test_run_page_refreshes_while_the_run_trains(server, driver):
    """A step appended to metrics.jsonl shows up without a reload (the page polls its curves every 5 s)."""
    url, runs = server
    driver.get(f"{url}/runs/grpo_demo")
    assert kpi(driver, "last step") == "30"
    with open(runs / "grpo_demo" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 31, "reward/mean": 0.9, "acc/heldout": 0.85}) + "\n")
    WebDriverWait(driver, 12).until(lambda d: kpi(d, "last step") == "31")
    assert not errors(driver)
