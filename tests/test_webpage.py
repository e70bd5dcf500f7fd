"""The web page (GET /) in headless Chromium against a real `diffad serve` process.

Chromium is driven through chromedriver with Selenium: the page loads the model list, an image goes in
through the page's file input, and the score, the verdict and the anomaly-map overlay must appear.
Needs the Debian packages chromium and chromium-driver (deploy/install-check-tools.sh installs them) and
the Python package selenium (the dev extra); without them the tests skip, naming what is missing.
A screenshot of each page is saved under pytest's temporary folder (its path is printed with -s).
"""

import io
import os
import re
import shutil

import numpy as np
import pytest
from diffad.benchmarks.load import ServerProcess
from diffad.training.demo_data import add_defect, good_texture
from PIL import Image
from test_service import make_tiny_bundle

CHROMIUM = next(filter(None, (os.environ.get("DIFFAD_CHROMIUM"), shutil.which("chromium"),
                              shutil.which("chromium-browser"))), None)
CHROMEDRIVER = os.environ.get("DIFFAD_CHROMEDRIVER") or shutil.which("chromedriver")
_missing = [what for what, present in (("chromium (Debian package chromium)", CHROMIUM),
                                       ("chromedriver (Debian package chromium-driver)", CHROMEDRIVER)) if not present]
if _missing:
    pytest.skip(f"headless web page test needs {' and '.join(_missing)}: run deploy/install-check-tools.sh as root",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs the Python package selenium (dev extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# What the machine's notes ask of a headless Chromium: no sandbox (root), no GPU, nothing from the network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900"]
NUMBER = re.compile(r"^-?\d+\.\d+$")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    bundle = make_tiny_bundle(tmp_path_factory)
    with ServerProcess(str(bundle), "onnxruntime", max_batch_size=4, max_queue_delay_ms=5, concurrency=1,
                       threads=1) as process:
        yield process


@pytest.fixture
def browser(tmp_path, monkeypatch):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a browser or driver
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def part_image(path, size: int = 96) -> None:
    """A woven RGB part with a scratch, as a PNG: what a camera on the line would send."""
    rng = np.random.default_rng(3)
    image, _ = add_defect(good_texture(size, rng, channels=3), "scratch", rng)
    Image.fromarray(image).save(path)


def open_page(browser, url: str):
    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    # the model list arrived: one option, the bundle's model
    wait.until(lambda d: d.execute_script("return document.getElementById('model').value") == "weave")
    return wait


def figures(browser) -> dict[str, str]:
    terms = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#figures dt")]
    values = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#figures dd")]
    return dict(zip(terms, values, strict=True))


def screenshot(browser, tmp_path, name: str):
    path = tmp_path / name
    assert browser.save_screenshot(str(path)), "no screenshot"
    print(f"screenshot: {path}")
    with Image.open(path) as shot:
        assert shot.size[0] > 300 and shot.size[1] > 300
    return path


def test_page_scores_an_uploaded_image_and_draws_its_map(server, browser, tmp_path):
    image_path = tmp_path / "part.png"
    part_image(image_path)
    wait = open_page(browser, server.url)
    assert browser.title == "diffad inspection"
    assert browser.find_element(By.ID, "verdict").text == "No image yet"
    model_label = browser.execute_script("return document.getElementById('model').selectedOptions[0].text")
    assert model_label.startswith("weave") and "32px" in model_label and "onnxruntime-cpu" in model_label

    browser.find_element(By.ID, "file").send_keys(str(image_path))  # the hidden input behind the drop zone
    wait.until(lambda d: d.find_element(By.ID, "verdict").text in ("Anomalous", "Normal"))

    verdict = browser.find_element(By.ID, "verdict")
    assert verdict.get_attribute("class") in ("bad", "ok")
    shown = figures(browser)
    assert shown["model"] == "weave"
    assert NUMBER.match(shown["image score"]), shown
    assert NUMBER.match(shown["normalized"]), shown
    assert shown["threshold"] == "0.4200"  # the bundle's calibrated threshold
    assert shown["size"] == "96 x 96"
    assert re.match(r"^\d+\.\d ms \(queue \d+\.\d, inference \d+\.\d\)$", shown["time"]), shown
    score = float(shown["image score"])
    assert verdict.text == ("Anomalous" if score >= 0.42 else "Normal")

    # The picture and the heat-map overlay: both canvases at the image's size, the overlay not blank, the
    # picture enlarged on screen (a 96 px image would be a thumbnail) and the overlay laid exactly over it.
    canvases = browser.execute_script("""
        const stats = (id) => {
          const c = document.getElementById(id), box = c.getBoundingClientRect();
          const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          let alpha = 0, visible = 0, lit = 0;
          for (let p = 0; p < px.length; p += 4) {
            alpha += px[p + 3]; if (px[p + 3] > 0) visible++; if (px[p] + px[p + 1] + px[p + 2] > 0) lit++;
          }
          return {width: c.width, height: c.height, shownWidth: box.width, shownHeight: box.height,
                  top: box.top, left: box.left, alpha, visible, lit, pixels: c.width * c.height};
        };
        return {image: stats('image'), overlay: stats('overlay')};
    """)
    image, overlay = canvases["image"], canvases["overlay"]
    assert (image["width"], image["height"]) == (96, 96) and image["lit"] > 0.9 * image["pixels"]
    assert (overlay["width"], overlay["height"]) == (96, 96)
    assert overlay["visible"] > 0 and overlay["alpha"] > 0, overlay
    assert image["shownWidth"] >= 3 * 96 and abs(image["shownWidth"] - image["shownHeight"]) < 1, canvases
    assert abs(overlay["shownWidth"] - image["shownWidth"]) < 1, canvases
    assert abs(overlay["shownHeight"] - image["shownHeight"]) < 1, canvases
    assert (abs(overlay["top"] - image["top"]), abs(overlay["left"] - image["left"])) < (1, 1), canvases

    # The opacity slider redraws the overlay: at 0 it is fully transparent.
    browser.execute_script("const s = document.getElementById('opacity'); s.value = '0';"
                           "s.dispatchEvent(new Event('input'));")
    transparent = browser.execute_script(
        "const c = document.getElementById('overlay');"
        "return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((v, i) => i % 4 == 3 && v)"
        ".length;")
    assert transparent == 0
    browser.execute_script("const s = document.getElementById('opacity'); s.value = '0.55';"
                           "s.dispatchEvent(new Event('input'));")
    assert browser.find_element(By.ID, "error").text == ""
    screenshot(browser, tmp_path, "webpage-inspected.png")


def test_page_shows_the_services_error_and_nothing_of_the_previous_image(server, browser, tmp_path):
    good, broken = tmp_path / "part.png", tmp_path / "broken.png"
    part_image(good)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 100, 50)).save(buffer, "PNG")
    broken.write_bytes(buffer.getvalue()[:60])  # a truncated PNG
    wait = open_page(browser, server.url)
    browser.find_element(By.ID, "file").send_keys(str(good))
    wait.until(lambda d: d.find_element(By.ID, "verdict").text in ("Anomalous", "Normal"))
    assert figures(browser)["size"] == "96 x 96"

    browser.find_element(By.ID, "file").send_keys(str(broken))
    wait.until(lambda d: d.find_element(By.ID, "verdict").text.startswith("Error"))
    assert browser.find_element(By.ID, "verdict").text == "Error 400"
    assert "cannot be decoded" in browser.find_element(By.ID, "error").text  # the service's reason
    # the previous image's score, picture and map are gone: they would read as this upload's
    assert figures(browser) == {}
    assert not browser.find_element(By.ID, "image").is_displayed()
    assert not browser.find_element(By.ID, "overlay").is_displayed()
    screenshot(browser, tmp_path, "webpage-error.png")
