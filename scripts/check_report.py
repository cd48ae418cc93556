"""Open an HTML report in real headless Chromium: every image must render and the console must stay clean.

Usage: python scripts/check_report.py runs/demo/report.html [--screenshot docs/demo_report.png]
Needs Debian's chromium and chromium-driver (``.ci/run`` installs them) and the selenium package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path


def find_browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or a clear error."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise RuntimeError("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    return browser, driver


def check_report(html: Path, screenshot: Path | None = None, width: int = 1200) -> dict:
    """Load ``html`` and return {"images", "broken", "errors", "title"}; optionally save a full-page PNG."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    profile = tempfile.mkdtemp(prefix="fv-chrome-")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},900"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.get(Path(html).resolve().as_uri())
        drv.execute_async_script(
            "const done = arguments[0];"
            "Promise.all([...document.images].map(i => i.complete ? 1 : new Promise(r => {i.onload = i.onerror = r;})))"
            ".then(() => done(1));")
        info = drv.execute_script(
            "const imgs = [...document.images];"
            "return {images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length,"
            "title: document.title, height: document.body.scrollHeight};")
        errors = [e["message"] for e in drv.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
        info["errors"] = errors
        if screenshot is not None:
            drv.set_window_size(width, int(info["height"]) + 100)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            drv.save_screenshot(str(screenshot))
        return info
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", type=Path)
    p.add_argument("--screenshot", type=Path)
    a = p.parse_args()
    info = check_report(a.html, a.screenshot)
    print(json.dumps(info, indent=1))
    return 0 if info["images"] and not info["broken"] and not info["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
