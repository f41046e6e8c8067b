"""`weft tap` and the dashboard (`weft ui`, started by `weft dev`) against the demo mesh, the dashboard
driven in headless Chromium (Debian's `chromium` and `chromium-driver`, through selenium).

A call carrying `authorization: Bearer s3cret` goes through the mesh; the secret must show nowhere:
not in `weft tap`'s output, not in any process's log, not in the dashboard's page. Screenshots are
saved under a temporary directory printed in the test output. Without Chromium, its driver or
selenium the browser tests say so and skip (`make test` installs them where it can).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.dev import test_dev
from tests.integration.dev.test_dev import Dev, _get
from tests.support import WEFT, Proc, wait_for

dev = test_dev.dev  # the same fixture: this module gets a weft dev of its own

pytestmark = [pytest.mark.integration, pytest.mark.timeout(360)]

SECRET = "s3cret"
CHROMIUM = os.environ.get("WEFT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("WEFT_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = Path(tempfile.mkdtemp(prefix="weft-dashboard-"))


def _consul(dev: Dev) -> str:
    return "http://" + dev.env["CONSUL_HTTP_ADDR"]


def _greeter_via_frontend_sidecar(dev: Dev) -> str:
    """host:port of frontend's sidecar's local listener for greeter (an app would dial it)."""
    _, body = _get(dev.admin("frontend") + "/config")
    return str(json.loads(body)["snapshot"]["upstreams"]["greeter"]["local_bind"])


def _secret_call(target: str, name: str) -> None:
    """SayHello through the mesh with an Authorization header, as raw protobuf bytes (field 1: name)."""
    import grpc

    raw = name.encode()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/weft.demo.v1.Greeter/SayHello")
        call(b"\n" + bytes([len(raw)]) + raw, timeout=10,
             metadata=(("authorization", f"Bearer {SECRET}"), ("x-password", SECRET)))


def _put(url: str, body: bytes) -> None:
    req = urllib.request.Request(url, data=body, method="PUT")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def _no_secret_in_logs(dev: Dev) -> None:
    for log in sorted((dev.state_dir / "logs").glob("*.log")):
        assert SECRET not in log.read_text(errors="replace"), f"{log} shows the secret"


def test_weft_tap_streams_calls_redacted_with_payloads(dev: Dev) -> None:
    _put(_consul(dev) + "/v1/kv/weft/tap/greeter", b'{"Payload": true, "MaxBytes": 512, "Redact": ["password"]}')
    target = _greeter_via_frontend_sidecar(dev)
    tap = Proc([*WEFT, "tap", "greeter", "--source", "frontend", "--payload", "-o", "json", "-n", "500",
                "-state-dir", str(dev.state_dir)], env=dev.env)
    try:
        # greeter has two instances in the tour (v1 and the v2 canary): one sidecar each
        wait_for(lambda: re.search(r"tapping \d+ sidecars?", tap.output()) is not None or not tap.alive(), timeout=30,
                 what="weft tap to open the greeter sidecar's /tap")
        time.sleep(0.5)  # the sidecar has the tap open once it answered; let the subscription settle

        def seen() -> bool:
            _secret_call(target, "tap-probe")
            return "tap-probe" in tap.output()

        wait_for(seen, timeout=60, interval=0.5, what="the probe call in weft tap's output")
        out = tap.output()
    finally:
        tap.stop()
    assert SECRET not in out, out[-2000:]
    probe = next(json.loads(line) for line in out.splitlines()
                 if line.startswith("{") and "tap-probe" in line)
    assert probe["direction"] == "inbound" and probe["source"] == "frontend" and probe["destination"] == "greeter"
    assert probe["request"]["headers"]["authorization"] == "[redacted]"
    assert probe["request"]["headers"]["x-password"] == "[redacted]"
    assert probe["request"]["messages"][0]["json"] == {"name": "tap-probe"}  # decoded by reflection
    assert "Hello, tap-probe" in probe["response"]["messages"][0]["json"]["message"]
    # the readable form: one line per call
    line = subprocess.run([*WEFT, "tap", "greeter", "-n", "1", "-state-dir", str(dev.state_dir)],
                          env=dict(os.environ, **dev.env), capture_output=True, text=True, timeout=60, check=False)
    assert line.returncode == 0, line.stderr
    first = line.stdout.strip().splitlines()[0]
    assert "greeter" in first and ("OK" in first or "->" in first or "<-" in first), first
    bad = subprocess.run([*WEFT, "tap", "greeter", "--status", "not a status"], env=dict(os.environ, **dev.env),
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "status" in bad.stderr
    _no_secret_in_logs(dev)


# -- the browser ----------------------------------------------------------------------------------

def _ui_url(dev: Dev) -> str:
    wait_for(lambda: "dashboard at" in dev.proc.output(), timeout=60, what="weft dev to start the dashboard")
    state = json.loads((dev.state_dir / "state.json").read_text())
    return str(state["ui"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.skip(f"browser tests need Debian's chromium and chromium-driver ({', '.join(missing)} missing: "
                    "apt-get install -y chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("browser tests need selenium (pip install -e '.[dev]')")
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1300", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    # the driver path is given: selenium-manager never runs, nothing is downloaded
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    print(f"\ndashboard screenshots in {SCREENSHOTS}")
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: Any, name: str) -> Path:
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def _edge_state(driver: Any, edge: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return str(driver.find_element("css selector", f'[data-edge="{edge}"]').get_attribute("data-state"))
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def test_dashboard_topology_shows_the_demo_edges(dev: Dev, browser: Any) -> None:
    browser.get(_ui_url(dev))
    for edge in ("frontend->greeter", "greeter->store"):
        wait_for(lambda edge=edge: _edge_state(browser, edge) == "ok", timeout=60, interval=0.5,  # type: ignore[misc]
                 what=f"edge {edge} with calls on the dashboard")
    wait_for(lambda: "frontend-1-sidecar-proxy" in browser.page_source, timeout=30, interval=0.5,
             what="the services table")
    assert "KV weft/intentions/greeter" in browser.page_source  # an intention with its origin
    _shot(browser, "topology")


def test_dashboard_check_form_uses_the_evaluator(dev: Dev, browser: Any) -> None:
    browser.get(_ui_url(dev))
    browser.find_element("id", "check-source").send_keys("store")
    browser.find_element("id", "check-destination").send_keys("greeter")
    browser.find_element("id", "check-run").click()
    wait_for(lambda: "DENIED" in browser.find_element("id", "check-result").text, timeout=20, interval=0.3,
             what="the check's answer")
    browser.find_element("id", "check-source").clear()
    browser.find_element("id", "check-source").send_keys("frontend")
    browser.find_element("id", "check-run").click()
    wait_for(lambda: "ALLOWED" in browser.find_element("id", "check-result").text, timeout=20, interval=0.3,
             what="the check's answer")


def test_a_denied_edge_turns_red(dev: Dev, browser: Any) -> None:
    browser.get(_ui_url(dev))
    wait_for(lambda: _edge_state(browser, "frontend->greeter") == "ok", timeout=60, interval=0.5,
             what="frontend -> greeter healthy first")
    result = dev.weft("intention", "deny", "frontend", "greeter")
    assert result.returncode == 0, result.stderr
    try:
        wait_for(lambda: _edge_state(browser, "frontend->greeter") == "failing", timeout=60, interval=0.5,
                 what="the frontend -> greeter edge to turn red")
        _shot(browser, "edge-denied")
        stroke = browser.execute_script(
            "return getComputedStyle(document.querySelector('[data-edge=\"frontend->greeter\"] line')).stroke")
        assert stroke == "rgb(224, 49, 49)", stroke
    finally:
        assert dev.weft("intention", "allow", "frontend", "greeter").returncode == 0
    wait_for(lambda: _edge_state(browser, "frontend->greeter") == "ok", timeout=60, interval=0.5,
             what="the edge to recover after allow")


def test_dashboard_tap_shows_live_calls_and_no_secret(dev: Dev, browser: Any) -> None:
    from selenium.webdriver.support.ui import Select

    browser.get(_ui_url(dev))
    wait_for(lambda: "greeter" in [o.text for o in browser.find_elements("css selector", "#tap-service option")],
             timeout=30, interval=0.5, what="greeter in the tap's service list")
    Select(browser.find_element("id", "tap-service")).select_by_value("greeter")
    browser.find_element("id", "tap-payload").click()
    browser.find_element("id", "tap-start").click()
    wait_for(lambda: re.search(r"tapping greeter on \d+ sidecar", browser.find_element("id", "tap-state").text)
             is not None, timeout=30,
             interval=0.3, what="the tap to open")
    target = _greeter_via_frontend_sidecar(dev)

    def probe_row() -> bool:
        _secret_call(target, "ui-probe")
        rows = browser.find_elements("css selector", "#tap-rows tr.tap-row")
        for row in rows[:50]:
            cells = [td.text for td in row.find_elements("css selector", "td")]
            if len(cells) < 5 or cells[2:4] != ["frontend", "greeter"] or "SayHello" not in cells[4]:
                continue
            row.click()
            # rows are added while we look: the detail must be the call of the row we meant
            try:
                shown = json.loads(browser.find_element("id", "tap-detail").text)
            except ValueError:
                continue
            if (shown.get("source"), shown.get("destination")) == ("frontend", "greeter") \
                    and "ui-probe" in json.dumps(shown):
                return True
        return False

    wait_for(probe_row, timeout=60, interval=0.5, what="a live call with its payload in the dashboard's tap")
    detail = browser.find_element("id", "tap-detail").text
    assert "[redacted]" in detail
    assert SECRET not in browser.page_source and SECRET not in detail
    path = _shot(browser, "tap")
    print(f"dashboard screenshot for the README: {path}")
    browser.find_element("id", "tap-stop").click()
    _no_secret_in_logs(dev)
