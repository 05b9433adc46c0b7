"""report.html in a real headless browser (Debian's chromium + chromium-driver, driven by selenium): it
loads, every plot decodes, and the page asks the network for nothing.

Skipped where chromium is not installed, except under CI=true (.ci/run installs it), where a missing
browser must fail the run instead of silently not testing the page.
"""

import json
import os
import shutil

import pytest

from weightkit.inspect.report import inspect_checkpoint, write_report
from weightkit.testing import save_tiny, tiny_bert

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _require_browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("the selenium package")
        webdriver = None
    if missing:
        message = (
            f"needs {' and '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return webdriver


@pytest.fixture
def browser(tmp_path):
    webdriver = _require_browser()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_report_loads_offline_with_every_plot_rendered_and_no_request_to_the_network(tmp_path, browser):
    model = save_tiny(tiny_bert(seed=0), tmp_path / "bert")
    out = write_report(inspect_checkpoint(model, device="cpu", spectra=3), tmp_path / "report")
    page = (out / "report.html").resolve()
    browser.get(page.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.title == f"weightkit inspect: {model}"
    widths = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.src.slice(0, 22)])"
    )
    # every plot of the report directory is on the page: the bar plots and the three spectra
    assert len(widths) == len(list((out / "plots").glob("*.png"))) > 3
    assert all(complete and width > 0 and src == "data:image/png;base64," for complete, width, src in widths)
    sent = [
        message["params"]
        for entry in browser.get_log("performance")
        if (message := json.loads(entry["message"])["message"])["method"] == "Network.requestWillBeSent"
    ]
    # Requests made by the report itself (the browser's own new-tab page loads chrome:// resources too;
    # a page asking for http://... shows up here with the page as its documentURL).
    by_page = [params["request"]["url"] for params in sent if params.get("documentURL") == page.as_uri()]
    assert page.as_uri() in by_page  # the log does record requests: the page's own is there
    assert any(url.startswith("data:image/png") for url in by_page)  # the plots are among them
    assert all(url == page.as_uri() or url.startswith("data:") for url in by_page), by_page
