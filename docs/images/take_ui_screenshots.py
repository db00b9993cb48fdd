"""Screenshots of a running `posttrain ui` for the README (docs/images/ui-*.png), in Debian's headless Chromium.

    python docs/images/take_ui_screenshots.py URL [--key KEY] [--run RUN_ID] [--report RUN_ID] [--only runs,reports,loop,feedback]

Each page is opened as a user would (the key typed into the page, the run clicked), given time to draw, and saved
at 1400 px wide. Nothing here is staged: point it at a dashboard over real runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
OUT = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--key", default="")
    p.add_argument("--run", help="run id to select on the Runs page")
    p.add_argument("--overlay", action="append", default=[], help="run ids to tick for comparison")
    p.add_argument("--report", help="run id whose report the Reports page shows")
    p.add_argument("--only", default="runs,reports,loop,feedback")
    p.add_argument("--suffix", default="")
    p.add_argument("--height", type=int, default=1000, help="viewport height (full_page is off: the first screen)")
    a = p.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": a.height})
        page.goto(a.url)
        if a.key:
            page.fill("#key", a.key)
            page.click("#key-form button")
        page.wait_for_timeout(1500)
        for name in a.only.split(","):
            page.click(f'a[data-tab="{name}"]')
            if name == "runs" and a.run:
                page.click(f'tr[data-run="{a.run}"]')
                for other in a.overlay:
                    page.check(f'input[aria-label="compare {other}"]')
            if name == "reports" and a.report:
                page.click(f'li[data-report="{a.report}"]')
            page.wait_for_timeout(3000)
            path = OUT / f"ui-{name}{a.suffix}.png"
            page.screenshot(path=str(path))
            print(path)
        browser.close()


if __name__ == "__main__":
    main()
