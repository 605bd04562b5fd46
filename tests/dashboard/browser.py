"""A page as a real browser leaves it after its scripts ran: headless Chromium's ``--dump-dom`` (Debian's ``chromium``;
``make test`` installs it). Missing, it fails loudly: these tests are the only ones that run the pages' scripts."""

from __future__ import annotations

import html
import re
import shutil
import subprocess

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
         "--hide-scrollbars", "--mute-audio"]


def chromium() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found is None:
        pytest.fail("headless Chromium is needed to test the dashboards in a real browser and none is on PATH: "
                    "`apt-get install -y chromium` (make test installs it)", pytrace=False)
    return found


def dump_dom(url: str, budget_ms: int = 4000, timeout_s: float = 60) -> str:
    """The DOM after ``budget_ms`` of the page's virtual time (its first polls answered: a fetch holds virtual time)."""
    done = subprocess.run([chromium(), *FLAGS, f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    return done.stdout


def text_of(dom: str, element_id: str) -> str:
    """The text inside the element with ``element_id`` (tags dropped), as a reader sees it."""
    found = re.search(rf'<(\w+)[^>]*\bid="{re.escape(element_id)}"[^>]*>(.*?)</\1>', dom, re.S)
    assert found is not None, f"no element #{element_id} in the page"
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", found[2])).split())


def screenshot(url: str, out, size: str = "1400,1500", budget_ms: int = 4000) -> None:
    subprocess.run([chromium(), *FLAGS, f"--virtual-time-budget={budget_ms}", f"--window-size={size}", f"--screenshot={out}", url],
                   capture_output=True, timeout=60, check=True)
