"""Fixtures: one mqttd for the module, and one headless Chromium driven through chromium-driver.

* `broker`: starts `$MQTTD_BIN` with `tcp://`, `http://` and `p2p://` listeners on port 0
  (the node's id and direct address in `broker.node_id`, `broker.node_direct`), anonymous
  clients allowed, in a fresh data directory, with one bridge (`BRIDGE`) to a remote broker that
  is not there (port 1), so that the bridges section has a real bridge to show; reads the bound ports from its `mqttd listening on`
  lines and the admin API key it prints on its first start (`mqttd api key admin KEY`).
  `broker.api(method, path)` calls the admin API with that key. At teardown it sends SIGTERM and
  asserts a clean exit.
* `browser`: Debian's Chromium (`/usr/bin/chromium`, headless) and chromedriver, 1280x900, with
  the broker's dashboard URL at `browser.base`. The driver is given by path, so that Selenium
  never downloads one.
* `screenshot(name)`: saves the window as `$DASHBOARD_SCREENSHOTS/NAME.png` (the artifact).

The broker's log is printed when a test fails, and the browser's console messages too.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# Generous: a debug broker and a browser share two busy cores in CI.
TIMEOUT = 30.0

os.environ.setdefault("SE_OFFLINE", "true")

# A bridge whose remote broker never answers: it stays "connecting", reconnecting slowly.
BRIDGE = "uplink"
BRIDGE_TOML = f"""
[[bridge]]
name = "{BRIDGE}"
urls = ["mqtt://127.0.0.1:1"]
topics = ["dash/bridge/# out 1"]
reconnect_min = 1
reconnect_max = 5
"""


def mqttd_bin() -> str:
    path = os.environ.get("MQTTD_BIN")
    if not path:
        raise RuntimeError("MQTTD_BIN is not set: run tests/dashboard/run.sh")
    return path


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


class Broker:
    """One mqttd process with its ports and its admin key."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.log_path = workdir / "mqttd.log"
        self.log = open(self.log_path, "wb")
        config = workdir / "mqttd.toml"
        config.write_text(BRIDGE_TOML)
        cmd = [mqttd_bin(), "--listen", "tcp://127.0.0.1:0", "--listen", "http://127.0.0.1:0",
               "--listen", "p2p://127.0.0.1:0",
               "--data-dir", str(workdir / "data"), "--allow-anonymous", "--config", str(config)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, bufsize=0)
        self.ports: dict[str, int] = {}
        self.key: str | None = None
        # The p2p:// listener's node id and its direct address.
        self.node_id: str | None = None
        self.node_direct: str | None = None
        self._read_startup()
        self.port = self.ports["tcp"]
        self.http = f"http://127.0.0.1:{self.ports['http']}"

    def _read_startup(self):
        deadline = time.monotonic() + TIMEOUT
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                text = line.decode().strip()
                if text.startswith("mqttd listening on p2p://"):
                    self.node_id = text[len("mqttd listening on p2p://"):]
                elif text.startswith("mqttd p2p direct "):
                    self.node_direct = text[len("mqttd p2p direct "):]
                elif text.startswith("mqttd listening on "):
                    scheme, addr = text[len("mqttd listening on "):].split("://", 1)
                    self.ports[scheme] = int(addr.rsplit(":", 1)[1])
                elif text.startswith("mqttd api key admin "):
                    self.key = text.split()[-1]
                if (self.key and {"tcp", "http"} <= self.ports.keys() and self.node_id
                        and self.node_direct):
                    return
            if self.proc.poll() is not None:
                break
        self.proc.kill()
        raise RuntimeError(
            f"mqttd did not report its ports and key (last line {line!r}):\n{self.logs()}")

    def api(self, method: str, path: str, body=None):
        """(status, JSON body or None) of an admin API call with the broker's key."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.http}/api/v1/{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else None

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        self.proc.stdout.close()
        self.log.close()
        return code


@pytest.fixture(scope="module")
def broker(tmp_path_factory, request):
    b = Broker(tmp_path_factory.mktemp("mqttd"))
    yield b
    code = b.stop()
    if request.session.testsfailed:
        print(f"--- mqttd log ---\n{b.logs()[-20000:]}")
    assert code == 0, f"mqttd exited with {code}"


def _executable(name: str, *fallbacks: str) -> str:
    for candidate in (name, *fallbacks):
        found = shutil.which(candidate)
        if found:
            return found
    raise RuntimeError(f"{name} is not installed (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser(broker, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _executable("chromium", "chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-sync",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=_executable("chromedriver"),
                      log_output=str(broker.workdir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(TIMEOUT)
    driver.base = broker.http + "/"
    yield driver
    try:
        for entry in driver.get_log("browser"):
            print(f"browser console: {entry.get('level')} {entry.get('message')}")
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshot(browser):
    folder = Path(os.environ.get("DASHBOARD_SCREENSHOTS", "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)

    def save(name: str) -> Path:
        path = folder / f"{name}.png"
        assert browser.save_screenshot(str(path)), f"no screenshot {path}"
        return path

    return save
