"""The web console in a real headless browser (Chromium through Selenium) against real node processes.

A 3-node mesh holds the bundled model split in two stages (`--max-vram`) with one standby: the page shows
the three nodes and the split, stays accessible (axe-core: no serious or critical violation, at laptop and
phone widths, keyboard tabs), streams a playground answer with the route header, counts it under
Traffic, and marks a killed node within the liveness timeout. A node with a console token shows the login
form and nothing else until the token is entered. Screenshots of every view go to
benchmarks/results/console/.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from harness.mesh_nodes import MeshNode, MeshNodes, wait_until
from harness.reference import ready_plan
from mesh402.mesh.config import MeshTimers
from mesh402.node.mesh_runtime import read_console_token
from tests.support.browser import LAPTOP, PHONE, axe_serious, log_in, screenshot, wait_js
from tests.support.split_mesh import SPLIT_ARGS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

VIEWS = ("mesh", "models", "traffic", "money", "playground")
_T = MeshTimers.fast()
# How long the mesh takes to call a killed node down (missed heartbeats or a lost connection, then a
# failed probe), plus the page's share: the SSE event and one status fetch (debounced 250 ms).
LIVENESS_S = _T.max_unresponsive + _T.probe_timeout
PAGE_S = 2.0


@pytest.fixture(scope="module")
def mesh3(tmp_path_factory) -> Iterator[tuple[MeshNodes, list[MeshNode]]]:
    nodes = MeshNodes(tmp_path_factory.mktemp("console3"))
    try:
        a = nodes.start("a", no_model=False, extra=SPLIT_ARGS)
        token = a.token()
        rest = [nodes.start(n, join=token, no_model=False, extra=SPLIT_ARGS, wait=False) for n in "bc"]
        for n in rest:
            n.proc.wait_http(f"{n.console}/api/status", timeout=120)
        servers = [a, *rest]
        nodes.wait_full_mesh(servers, timeout=60)
        wait_until(lambda: all(ready_plan(n) is not None for n in servers), timeout=240,
                   what="a ready split plan seen by every node")
        yield nodes, servers
    finally:
        nodes.stop_all()


def show(driver, view: str) -> None:
    driver.find_element("id", f"tab-{view}").click()
    wait_js(driver, f"!document.getElementById('view-{view}').hidden", 5, f"the {view} view")


def test_console_shows_the_mesh_streams_a_chat_and_sees_a_node_die(mesh3, browser) -> None:
    nodes, servers = mesh3
    a = servers[0]
    ids = {n.node_id for n in servers}
    plan = ready_plan(a)
    assert plan is not None and len(plan["stages"]) == 2, plan
    stage_nodes = [s[0] for s in plan["stages"]]
    standby = next(n for n in servers if n.node_id not in stage_nodes)
    entry = next(n for n in servers if n.node_id == plan["host"])

    log_in(browser, entry.console, read_console_token(entry.home) or "")
    # Mesh: all three nodes, each peer alive and directly connected, with an RTT
    wait_js(browser, f"document.querySelectorAll('#nodes tr[data-node-id]').length === 3", 20, "three nodes")
    shown = set(browser.execute_script(
        "return [...document.querySelectorAll('#nodes tr[data-node-id]')].map(r => r.dataset.nodeId)"))
    assert shown == ids
    wait_js(browser, "[...document.querySelectorAll('#nodes tr[data-state=alive]')].length === 2 && "
                     "[...document.querySelectorAll('#nodes tr[data-state=alive] td:nth-child(4)')]"
                     ".every(td => /ms$/.test(td.textContent))", 20, "two alive peers with an RTT")
    assert browser.execute_script(
        "return document.querySelectorAll('#topology g.node').length") == 3
    assert browser.execute_script("return document.querySelectorAll('#topology line.link').length") >= 2
    assert "direct" in browser.find_element("id", "nodes").text  # loopback QUIC: no relay

    # Models: the split plan (two stages, their layers and tensor bytes) and the standby
    show(browser, "models")
    bar = f"#models .plan[data-host='{plan['host']}'] .bar .seg"
    wait_js(browser, f"document.querySelectorAll(\"{bar}\").length === 2", 20, "the split plan's two stages")
    segs = browser.execute_script(
        f"return [...document.querySelectorAll(\"{bar}\")].map(s => [s.dataset.nodeId, s.textContent])")
    assert [s[0] for s in segs] == stage_nodes
    for (node, start, end, tensor_bytes), (_, text) in zip(plan["stages"], segs):
        assert f"layers {start}–{end}" in text, text
        assert "MB" in text
    models_text = browser.find_element("id", "models").text
    assert f"plan epoch {plan['epoch']}" in models_text
    assert "Standby nodes:" in models_text and "Standby nodes: none" not in models_text, models_text

    # every view: accessible, screenshot at laptop width; the mesh and models views at phone width too
    for view in VIEWS:
        show(browser, view)
        assert axe_serious(browser) == [], view
        screenshot(browser, f"{view}-laptop", LAPTOP)
    for view in ("mesh", "models"):
        show(browser, view)
        browser.set_window_size(*PHONE)
        fits = "return document.documentElement.scrollWidth <= window.innerWidth + 1"
        deadline = time.monotonic() + 5  # the resize reflows and the view re-renders from the next event
        while not browser.execute_script(fits) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert browser.execute_script(fits), (
            f"{view}: wider than a phone: " + str(browser.execute_script(
                "return [document.documentElement.scrollWidth, window.innerWidth, [...document.querySelectorAll('*')]"
                ".filter(e => e.getBoundingClientRect().right > window.innerWidth + 1).slice(-3)"
                ".map(e => e.tagName + '.' + e.className + ' ' + e.getBoundingClientRect().right)]")))
        assert axe_serious(browser) == [], f"{view} at phone width"
        screenshot(browser, f"{view}-phone", PHONE)
    browser.set_window_size(*LAPTOP)

    # keyboard: the tabs follow the arrow keys
    from selenium.webdriver.common.keys import Keys

    show(browser, "mesh")
    browser.find_element("id", "tab-mesh").send_keys(Keys.ARROW_RIGHT)
    assert browser.execute_script("return document.activeElement.id") == "tab-models"
    assert browser.find_element("id", "tab-models").get_attribute("aria-selected") == "true"

    # Playground: model auto, streamed into the page piece by piece, with the route header
    show(browser, "playground")
    browser.execute_script(
        "window.__lengths = [];"
        "new MutationObserver(() => { const t = document.querySelector('#chat-log li.assistant:last-child .text');"
        " if (t) window.__lengths.push(t.textContent.length); })"
        ".observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});")
    browser.find_element("id", "chat-max").clear()
    browser.find_element("id", "chat-max").send_keys("24")
    browser.find_element("id", "chat-input").send_keys("Name three colours of the rainbow.")
    browser.find_element("id", "chat-send").click()
    wait_js(browser, "document.querySelector('#chat-log li.assistant[data-done]')", 180, "the playground answer")
    answer = browser.find_element("css selector", "#chat-log li.assistant .text").text
    assert answer.strip() and "[failed" not in answer and "Error" not in answer, answer
    lengths = [n for n in browser.execute_script("return window.__lengths") if n > 0]
    assert len(set(lengths)) >= 2, f"the answer arrived in one piece, not streamed: {lengths}"
    route = browser.find_element("id", "chat-route").text
    assert route.startswith("x-mesh402-route: model=smollm2-135m-instruct") and "class=" in route, route
    screenshot(browser, "playground-laptop", LAPTOP)

    # Traffic: the chat is counted (the stream's next "console" event), with a TTFT
    show(browser, "traffic")
    row = "#traffic-models tr[data-model='smollm2-135m-instruct']"
    wait_js(browser, f"document.querySelector(\"{row}\")", 10, "the model's traffic row")
    cells = browser.execute_script(f"return [...document.querySelector(\"{row}\").cells].map(c => c.textContent)")
    assert int(cells[1]) >= 1 and cells[5].endswith("ms"), cells
    assert "Name three colours" not in browser.find_element("id", "traffic-recent").text  # no prompt kept
    screenshot(browser, "traffic-laptop", LAPTOP)

    # a node dies: the page marks it within the liveness timeout, no reload
    show(browser, "mesh")
    t0 = time.monotonic()
    nodes.kill9(standby)
    wait_js(browser, f"['down', 'left', 'gone'].includes((document.querySelector("
                     f"\"#nodes tr[data-node-id='{standby.node_id}']\") || {{}}).dataset?.state)",
            2 * LIVENESS_S + PAGE_S, "the killed node marked down")  # room for a loaded machine; the time is printed
    took = time.monotonic() - t0
    print(f"page marked the killed node down {took:.2f}s after kill -9 (liveness timeout {LIVENESS_S:.1f}s)")
    assert "down" in browser.find_element("id", "events").text or "forgotten" in browser.find_element("id", "events").text
    screenshot(browser, "mesh-after-kill-laptop", LAPTOP)


TOKEN = "console-test-token-0123456789"


def test_console_token_page_asks_for_it_and_shows_nothing_before(mesh_nodes: MeshNodes, browser) -> None:
    t = mesh_nodes.start("t", wait=False, env={"MESH402_CONSOLE_TOKEN": TOKEN})
    t.proc.wait_http(f"{t.console}/api/traffic", timeout=60, ok=(401,))
    node_id = httpx.get(f"{t.console}/api/status", headers={"authorization": f"Bearer {TOKEN}"}, timeout=5).json()["node_id"]

    browser.get(f"{t.console}/")
    wait_js(browser, "!document.getElementById('login').hidden", 10, "the login form")
    assert browser.execute_script("return document.getElementById('app').hidden") is True
    page = browser.execute_script("return document.documentElement.outerHTML")
    assert node_id not in page and node_id[:12] not in page and "m402" not in page.replace("m402…", "")
    # the page's own fetches get nothing without the token
    assert browser.execute_script(
        "const r = new XMLHttpRequest(); r.open('GET', '/api/traffic', false); r.send(); return r.status") == 401
    assert axe_serious(browser) == []
    screenshot(browser, "login-laptop", LAPTOP)

    browser.find_element("id", "token").send_keys("wrong")
    browser.find_element("css selector", "#login-form button").click()
    wait_js(browser, "document.getElementById('login-error').textContent", 5, "the wrong-token message")
    assert browser.execute_script("return document.getElementById('app').hidden") is True

    browser.find_element("id", "token").clear()
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.find_element("css selector", "#login-form button").click()
    wait_js(browser, f"document.querySelector(\"#nodes tr[data-node-id='{node_id}']\")", 15, "the console after login")
    assert TOKEN not in browser.current_url
    cookie = browser.get_cookie("mesh402_console")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert TOKEN not in cookie["value"]
    assert "mesh402_console" not in browser.execute_script("return document.cookie")  # HttpOnly: scripts cannot read it
    wait_js(browser, "document.getElementById('conn').textContent === 'live'", 10, "the live event stream (cookie-authenticated)")

    browser.find_element("id", "logout").click()
    wait_js(browser, "!document.getElementById('login').hidden", 10, "the login form after logging out")
    assert browser.execute_script(
        "const r = new XMLHttpRequest(); r.open('GET', '/api/traffic', false); r.send(); return r.status") == 401
