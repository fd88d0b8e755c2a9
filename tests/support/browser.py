"""A real headless browser for the console tests: Debian's chromium and chromium-driver through Selenium
(`scripts/setup-browser.sh` installs them), axe-core from npm for accessibility, screenshots to
benchmarks/results/console/ (not committed).

Nothing is downloaded at run time: the driver and the browser are the system's, named explicitly, so
Selenium Manager never runs. Outside CI a machine without them skips these tests with the reason; in CI
(`CI` set) their absence fails."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.procs import REPO

CHROMIUM = ("chromium", "chromium-browser")
DRIVER = ("chromedriver",)
AXE = REPO / "node_modules" / "axe-core" / "axe.min.js"
SHOTS = REPO / "benchmarks" / "results" / "console"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
LAPTOP = (1280, 900)
PHONE = (390, 844)


def _which(names: tuple[str, ...]) -> str | None:
    return next((p for p in (shutil.which(n) for n in names) if p), None)


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (bash scripts/setup.sh --dev)"
    if _which(CHROMIUM) is None or _which(DRIVER) is None:
        return "chromium / chromium-driver are not installed (bash scripts/setup-browser.sh)"
    if not AXE.exists():
        return "axe-core is not installed (npm ci)"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    """A fresh headless Chromium (its own profile directory) at laptop size; quit afterwards."""
    why = _missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mesh402-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = _which(CHROMIUM) or ""
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={LAPTOP[0]},{LAPTOP[1]}")
    driver = webdriver.Chrome(options=opts, service=Service(_which(DRIVER) or ""))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def axe_serious(driver: Any) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now (rule, impact, where)."""
    if not driver.execute_script("return typeof window.axe === 'object'"):
        driver.execute_script(AXE.read_text())
    found = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations.map(v => ("
        "{id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.slice(0, 5).map(n => n.target.join(' '))}))));")
    return [v for v in found if v["impact"] in ("serious", "critical")]


def screenshot(driver: Any, name: str, size: tuple[int, int] = LAPTOP) -> Path:
    """The whole page at `size` width (the window grows to the page's height), as SHOTS/<name>.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.set_window_size(size[0], size[1])
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(size[0], max(size[1], min(height + 120, 4000)))
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(*size)
    return path


def wait_js(driver: Any, script: str, timeout: float, what: str) -> Any:
    """Poll `script` (a JavaScript expression) in the page until it is truthy; returns its value."""
    import time

    t0 = time.monotonic()
    last: Any = None
    while time.monotonic() - t0 < timeout:
        last = driver.execute_script(f"return ({script});")
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not seen in the page within {timeout}s (last: {last!r})")


def log_in(driver: Any, console: str, token: str) -> None:
    """Open the console page and log in the way the operator does: type the node's console token (from
    <home>/console.token) into the login form; the page then holds an HttpOnly session cookie."""
    driver.get(f"{console}/")
    wait_js(driver, "!document.getElementById('login').hidden", 15, "the login form")
    driver.find_element("id", "token").send_keys(token)
    driver.find_element("css selector", "#login-form button").click()
    wait_js(driver, "document.getElementById('login').hidden && !document.getElementById('app').hidden", 15,
            "the console after login")
