"""The dashboard in headless Chromium against a real broker: sign in (a wrong key refused), a
client connected with mosquitto_sub shown and kicked, the client list's pages (more sessions
than a page holds), a retained message published with mosquitto_pub shown and deleted, the
other pages (bridges with their state and last error, peer-to-peer links), dark mode and a
phone-sized window. Each
page is kept as a screenshot. The tests run in order on one broker and one browser; every wait
polls for a condition (TIMEOUT), none is a fixed sleep."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import urllib.request

from selenium.common.exceptions import (ElementClickInterceptedException,
                                        NoSuchElementException,
                                        StaleElementReferenceException)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import BRIDGE, TIMEOUT

# A UDP address as the API shows a path: iroh may pick any of the node's local addresses for a
# direct path (the loopback one it was given, or another interface's), so any address will do.
SOCKET_ADDRESS = re.compile(r"(\d{1,3}\.){3}\d{1,3}:\d+|\[[0-9a-fA-F:.]+\]:\d+")

KEY_STORAGE = "mqttd.apiKey"
FLAKY = (NoSuchElementException, StaleElementReferenceException,
         ElementClickInterceptedException)


def wait(driver, condition, what: str):
    """Polls `condition(driver)` until it is truthy (its value returned) or TIMEOUT passes.
    The tables are redrawn while the test looks at them, so a vanished element only means
    "look again"."""
    return WebDriverWait(driver, TIMEOUT, poll_frequency=0.1, ignored_exceptions=FLAKY).until(
        condition, message=f"timed out after {TIMEOUT} s waiting for {what}")


def css(testid: str, extra: str = "") -> str:
    return f'[data-testid="{testid}"]{extra}'


def find(driver, testid: str, extra: str = ""):
    return driver.find_element(By.CSS_SELECTOR, css(testid, extra))


def shown(driver, testid: str, extra: str = ""):
    """The element if it is displayed, else None (for `wait`)."""
    element = find(driver, testid, extra)
    return element if element.is_displayed() else None


def click(driver, selector: str, what: str):
    """Clicks what `selector` finds, looking again if it was redrawn in between."""
    def attempt(d):
        d.find_element(By.CSS_SELECTOR, selector).click()
        return True
    wait(driver, attempt, what)


def go(driver, page: str):
    click(driver, css(f"nav-{page}"), f"the {page} tab")
    wait(driver, lambda d: shown(d, f"page-{page}"), f"the {page} page")


def sign_in(driver, key: str):
    wait(driver, lambda d: shown(d, "login-key"), "the sign-in form")
    field = find(driver, "login-key")
    field.clear()
    field.send_keys(key)
    click(driver, css("login-submit"), "the sign-in button")


def confirm(driver, screenshot=None, name: str | None = None):
    wait(driver, lambda d: shown(d, "confirm-dialog"), "the confirmation dialog")
    if screenshot is not None and name:
        screenshot(name)
    click(driver, css("confirm-ok"), "the dialog's OK button")
    wait(driver, lambda d: not find(d, "confirm-dialog").is_displayed(), "the dialog to close")


def rows(driver, testid: str, attribute: str) -> list[str]:
    return [r.get_attribute(attribute)
            for r in driver.find_elements(By.CSS_SELECTOR, css(testid))]


# ---- the tests, in order --------------------------------------------------------------------

def test_the_page_is_served_without_a_key_under_a_strict_policy(broker):
    with urllib.request.urlopen(broker.http + "/", timeout=TIMEOUT) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        policy = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert 'data-testid="login"' in r.read().decode()
    status, _ = broker.api("GET", "stats")
    assert status == 200


def test_a_wrong_key_shows_an_error(browser, screenshot):
    browser.get(browser.base)
    sign_in(browser, "mqttd_this-is-not-a-valid-key")
    error = wait(browser, lambda d: shown(d, "login-error"), "the sign-in error")
    wait(browser, lambda d: "not valid" in error.text, "the error to say the key is not valid")
    assert not browser.find_element(By.ID, "app").is_displayed()
    assert browser.execute_script(f"return sessionStorage.getItem('{KEY_STORAGE}')") is None
    screenshot("01-sign-in-wrong-key")


def test_signing_in_shows_live_figures_and_charts(browser, broker, screenshot):
    sign_in(browser, broker.key)
    wait(browser, lambda d: shown(d, "page-overview"), "the overview after signing in")
    assert browser.execute_script(f"return sessionStorage.getItem('{KEY_STORAGE}')") == broker.key
    wait(browser, lambda d: re.search(r"\d", find(d, "figure-clients").text),
         "the clients figure")
    # Rates need two polls of /api/v1/stats: then the legends carry numbers.
    wait(browser, lambda d: re.search(r"in \d", d.find_element(By.ID, "legend-messages").text),
         "the messages chart's first rate")
    wait(browser, lambda d: "live" in find(d, "live-status").text, "the live indicator")
    screenshot("02-overview")


def test_a_connected_client_appears_and_is_kicked(browser, broker, screenshot):
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "5",
         "-i", "dash-sub-1", "-q", "1", "-t", "dash/#", "-t", "site/+/state"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        go(browser, "clients")
        row = css("client-row", '[data-client-id="dash-sub-1"]')
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), "dash-sub-1 in the table")
        search = find(browser, "clients-search")
        search.send_keys("dash-")
        wait(browser, lambda d: (ids := rows(d, "client-row", "data-client-id"))
             and all(i.startswith("dash-") for i in ids), "the search to keep dash-* only")
        click(browser, row, "dash-sub-1's row")
        detail = wait(browser, lambda d: shown(d, "client-detail"), "the client's details")
        wait(browser, lambda d: "dash/#" in detail.text and "site/+/state" in detail.text,
             "its two subscriptions in the details")
        assert "tcp" in detail.text
        screenshot("03-clients")

        click(browser, row + " " + css("client-kick"), "dash-sub-1's kick button")
        confirm(browser, screenshot, "04-kick-confirm")
        wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, row),
             "dash-sub-1 to leave the table")
        # mosquitto_sub got DISCONNECT 0x98 and ended.
        sub.wait(TIMEOUT)
        status, _ = broker.api("GET", "clients/dash-sub-1")
        assert status == 404, "the kicked client's session (no expiry) should be gone"
        screenshot("05-clients-after-kick")
        search.clear()
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()


def persistent_session(port: int, client_id: str):
    """Leaves a session held offline: an MQTT 3.1.1 CONNECT without clean session, then
    DISCONNECT."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        cid = client_id.encode()
        body = b"\x00\x04MQTT\x04\x00\x00\x3c" + len(cid).to_bytes(2, "big") + cid
        s.sendall(bytes([0x10, len(body)]) + body)
        ack = b""
        while len(ack) < 4:
            chunk = s.recv(4 - len(ack))
            assert chunk, "the broker closed before CONNACK"
            ack += chunk
        assert ack[:2] == b"\x20\x02" and ack[3] == 0, ack
        s.sendall(b"\xe0\x00")


def test_the_client_list_has_pages_when_one_does_not_hold_it(browser, broker, screenshot):
    ids = [f"dash-page-{i:02d}" for i in range(55)]
    for client_id in ids:
        persistent_session(broker.port, client_id)
    try:
        go(browser, "clients")
        search = find(browser, "clients-search")
        search.clear()
        search.send_keys("dash-page-")
        wait(browser, lambda d: shown(d, "clients-pager"), "the page controls")
        wait(browser, lambda d: find(d, "clients-page").text == "page 1 of 2", "page 1 of 2")
        assert len(rows(browser, "client-row", "data-client-id")) == 50
        assert find(browser, "clients-prev").get_attribute("disabled") is not None
        click(browser, css("clients-next"), "the next page button")
        wait(browser, lambda d: find(d, "clients-page").text == "page 2 of 2", "page 2 of 2")
        wait(browser, lambda d: rows(d, "client-row", "data-client-id") == ids[50:],
             "the last five sessions on page 2")
        assert find(browser, "clients-next").get_attribute("disabled") is not None
        screenshot("05b-clients-page-2")
        click(browser, css("clients-prev"), "the previous page button")
        wait(browser, lambda d: find(d, "clients-page").text == "page 1 of 2", "back on page 1")
        search.clear()
        search.send_keys("dash-page-5")
        wait(browser, lambda d: not shown_or_none(d, "clients-pager"),
             "no page controls for one page")
    finally:
        for client_id in ids:
            broker.api("DELETE", f"sessions/{client_id}")
        find(browser, "clients-search").clear()


def shown_or_none(driver, testid: str):
    """The element if it is displayed, else None (never raises for a missing one)."""
    found = driver.find_elements(By.CSS_SELECTOR, css(testid))
    return found[0] if found and found[0].is_displayed() else None


def test_a_retained_message_is_shown_and_deleted(browser, broker, screenshot):
    topic = "dash/retained/one"
    payload = "hello from the dashboard test"
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-r",
                    "-t", topic, "-m", payload], check=True, timeout=TIMEOUT)
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-r",
                    "-t", "site/7/state", "-m", '{"door":"open","temp":21.5}'],
                   check=True, timeout=TIMEOUT)
    status, body = broker.api("GET", "retained/dash/retained/one")
    assert status == 200 and body["payload"] == payload, body

    go(browser, "retained")
    row = css("retained-row", f'[data-topic="{topic}"]')
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), f"{topic} in the table")
    click(browser, row, f"{topic}'s row")
    wait(browser, lambda d: shown(d, "retained-payload").text == payload, "its payload shown")
    screenshot("06-retained")

    click(browser, css("retained-view-delete"), "the delete button")
    confirm(browser)
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, row), f"{topic} to go")
    status, body = broker.api("GET", "retained/dash/retained/one")
    assert status == 404, body
    status, body = broker.api("GET", "retained?filter=site/%2B/state")
    assert status == 200 and [m["topic"] for m in body["data"]] == ["site/7/state"], body
    screenshot("07-retained-after-delete")


def test_listeners_and_the_network_page(browser, broker, screenshot):
    go(browser, "listeners")
    wait(browser, lambda d: {"tcp", "http"} <= set(rows(d, "listener-row", "data-kind")),
         "the tcp and http listeners")
    wait(browser, lambda d: shown(d, "transport-tcp"), "the clients by transport")
    # The TCP listener's counters: the clients the steps before connected through it.
    connections = css("listener-row", '[data-kind="tcp"]') + " " + css("listener-connections")
    wait(browser, lambda d: re.match(r"[1-9]", d.find_element(By.CSS_SELECTOR, connections).text),
         "the tcp listener's connection count")
    screenshot("08-listeners")

    go(browser, "network")
    # The configured bridge, whose remote broker is not there: not connected, retrying, with
    # the reason, from /api/v1/bridges.
    bridge = css("bridge-row", f'[data-bridge="{BRIDGE}"]')
    wait(browser, lambda d: shown(d, "bridge-row", f'[data-bridge="{BRIDGE}"]'),
         "the bridge's row")
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, bridge).get_attribute("data-state")
         in ("connecting", "backing_off")
         and "mqtt://127.0.0.1:1" in d.find_element(By.CSS_SELECTOR, bridge).text,
         "the bridge's state and remote broker")
    wait(browser, lambda d: "127.0.0.1:1" in d.find_element(
        By.CSS_SELECTOR, bridge + " " + css("bridge-error")).text,
         "the bridge's last error")
    status, body = broker.api("GET", "bridges")
    assert status == 200 and body[0]["name"] == BRIDGE and body[0]["transport"] == "mqtt", body
    # The p2p:// listener, and no peer link until a node connects.
    wait(browser, lambda d: shown(d, "p2p-listener-row"), "the p2p:// listener's row")
    wait(browser, lambda d: shown(d, "peers-none"), "the note that no peer link is open")
    wait(browser, lambda d: "Handshakes" in find(d, "quic-figures").text, "the QUIC figures")
    # A subscriber over a peer-to-peer link, at the node's direct address: a direct link.
    sub = subprocess.Popen(
        [os.environ["MQTTD_BIN"], "sub", "-L", f"p2p://{broker.node_id}/dash/p2p",
         "--peer-addr", broker.node_direct, "-i", "dash-p2p", "-C", "1", "-W", "120"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        peer = css("peer-row", '[data-path="direct"]')
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, peer), "the direct peer link")
        wait(browser, lambda d: SOCKET_ADDRESS.search(d.find_element(By.CSS_SELECTOR, peer).text)
             and " ms" in d.find_element(By.CSS_SELECTOR, peer).text,
             "the link's address and round-trip time")
        status, links = broker.api("GET", "p2p/peers")
        assert status == 200 and links[0]["path"] == "direct", links
        screenshot("09-quic-p2p-bridges")
        # The same client's details: its path now, from its QUIC statistics.
        go(browser, "clients")
        row = css("client-row", '[data-client-id="dash-p2p"]')
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), "dash-p2p in the table")
        click(browser, row, "dash-p2p's row")
        wait(browser, lambda d: shown(d, "client-detail-fields"), "its details")
        wait(browser, lambda d: "Round trip" in (text := find(d, "client-detail-fields").text)
             and "Path now" in text and SOCKET_ADDRESS.search(text), "its path and round-trip time")
        screenshot("09c-p2p-client-path")
        click(browser, css("client-detail") + " button", "the details' close button")
        go(browser, "network")
        # One message once it is subscribed, and the subscriber leaves cleanly: the link goes.
        wait(browser, lambda d: broker.api("GET", "clients/dash-p2p")[1].get("subscriptions") == 1,
             "dash-p2p's subscription")
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                        "-t", "dash/p2p", "-m", "bye"], check=True, timeout=TIMEOUT)
        sub.wait(TIMEOUT)
        wait(browser, lambda d: shown(d, "peers-none"), "the link to leave the list")
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    browser.execute_script("arguments[0].scrollIntoView()", find(browser, "bridges"))
    screenshot("09b-bridges")


def test_dark_mode_and_a_phone_sized_window(browser, broker, screenshot):
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-i", "dash-sub-2",
         "-t", "dash/#"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        go(browser, "overview")
        background = browser.execute_script(
            "return getComputedStyle(document.body).backgroundColor")
        channels = [int(c) for c in re.findall(r"\d+", background)[:3]]
        assert max(channels) < 64, f"dark mode background is {background}"
        wait(browser, lambda d: re.search(r"tcp 1\b",
                                          d.find_element(By.ID, "legend-transports").text),
             "the transports chart to show the client connected over TCP")
        screenshot("10-overview-dark")
        go(browser, "clients")
        wait(browser, lambda d: "dash-sub-2" in rows(d, "client-row", "data-client-id"),
             "dash-sub-2 in the table")
        screenshot("11-clients-dark")

        browser.set_window_size(390, 844)
        go(browser, "overview")
        width = browser.execute_script("return document.documentElement.scrollWidth")
        viewport = browser.execute_script("return window.innerWidth")
        assert width <= viewport, f"the page scrolls sideways: {width} > {viewport}"
        screenshot("12-overview-phone")
    finally:
        browser.set_window_size(1280, 900)
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        sub.kill()
        sub.wait()


def test_signing_out_forgets_the_key(browser, screenshot):
    click(browser, css("logout"), "the sign-out button")
    wait(browser, lambda d: shown(d, "login"), "the sign-in form")
    assert browser.execute_script(f"return sessionStorage.getItem('{KEY_STORAGE}')") is None
    browser.refresh()
    wait(browser, lambda d: shown(d, "login-key"), "the sign-in form after a reload")
