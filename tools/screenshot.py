#!/usr/bin/env python
"""Screenshot a page (e.g. a `csmcir report`) with headless Chromium, as the README's figure.

python tools/screenshot.py reports/synth-test/index.html docs/report.png --width 1400 --height 1100
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("page", help="a local HTML file or a URL")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1100)
    a = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--hide-scrollbars",
        f"--window-size={a.width},{a.height}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        page = Path(a.page)
        driver.get(page.resolve().as_uri() if page.exists() else a.page)
        driver.execute_script(
            "return new Promise(r => { const w = () => Array.from(document.images).every(i => i.complete) ? r() : setTimeout(w, 50); w(); })"
        )
        driver.save_screenshot(a.out)
    finally:
        driver.quit()
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
