"""Screenshots of a report for the README: `python docs/screenshots.py RUN_DIR` writes docs/report-*.png.

Opens RUN_DIR/report.html in headless Chromium (the test suite's DevTools-pipe driver) and captures the
summary at the top and the section of originals beside reconstructions with the risk ranking."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from chromium_driver import Browser, file_url, find_chromium  # noqa: E402

WIDTH = 1100


def capture(report: Path) -> None:
    browser = Browser(find_chromium() or sys.exit("no Chromium on PATH"))
    try:
        session = browser.open(file_url(report))
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": WIDTH, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        top = json.loads(browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """JSON.stringify(
            ['results', 'reconstructions', 'risk'].map(id => document.getElementById(id)?.getBoundingClientRect().top
                                                              + window.scrollY))"""}, session=session)["result"]["value"])
        shots = {"report-summary.png": (0, top[0] + 420), "report-images.png": (top[1] - 10, top[2] + 700)}
        for name, (y0, y1) in shots.items():
            data = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
                "x": 0, "y": y0, "width": WIDTH, "height": min(y1 - y0, 1600), "scale": 1}}, session=session)["data"]
            (HERE / name).write_bytes(base64.b64decode(data))
            print(HERE / name)
    finally:
        browser.close()


if __name__ == "__main__":
    capture(Path(sys.argv[1]) / "report.html")
