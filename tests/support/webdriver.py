"""A small W3C WebDriver client over httpx, driving Debian's headless Chromium through its chromedriver.

Enough for the console's browser tests (open a page, type, click, run a script, wait, screenshot), without
adding Selenium or Playwright to the environment: chromedriver speaks plain JSON over HTTP.
"""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: The element reference key of the W3C protocol.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
# Headless and quiet: no sandbox (CI containers run as root), no GPU, and nothing that calls home.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1360,1000"]


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} is missing: install Debian's browser with `apt-get install -y chromium chromium-driver` (.ci/run does)"
    return None


class WebDriverError(RuntimeError):
    pass


class Browser:
    """One headless Chromium session with a fresh profile; close() ends it and its chromedriver."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.profile = Path(tempfile.mkdtemp(prefix="rayft-chromium-"))
        self.driver = subprocess.Popen([str(CHROMEDRIVER), f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        self._wait_ready()
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": str(CHROMIUM), "args": [*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}"]}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    return
            except (httpx.TransportError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or self.driver.poll() is not None:
                raise WebDriverError("chromedriver did not start")
            time.sleep(0.1)

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        response = self.http.request(method, path, json=body if body is not None else ({} if method == "POST" else None))
        value = response.json().get("value")
        if response.status_code != 200:
            raise WebDriverError(f"{method} {path}: {value}")
        return value

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    def get(self, url: str) -> None:
        self._call("POST", self._s("/url"), {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """Run `script` (a function body; `arguments` holds args) in the page; returns its JSON result."""
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def find(self, css: str) -> str:
        return self._call("POST", self._s("/element"), {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css: str) -> None:
        self._call("POST", self._s(f"/element/{self.find(css)}/click"))

    def type(self, css: str, text: str) -> None:
        element = self.find(css)
        self._call("POST", self._s(f"/element/{element}/clear"))
        self._call("POST", self._s(f"/element/{element}/value"), {"text": text})

    def text(self, css: str) -> str:
        return self.run("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)

    def wait(self, script: str, *args: Any, timeout: float = 120, what: str = "") -> Any:
        """Poll `script` until it returns something truthy; that value. Waiting is not an assertion on time: the
        limit only stops a page that never gets there."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.run(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                body = self.text("main")
                raise WebDriverError(f"gave up waiting for {what or script!r}; the page says: {body!r:.500}")
            time.sleep(0.2)

    def wait_for(self, css: str, timeout: float = 120) -> None:
        self.wait("return !!document.querySelector(arguments[0]);", css, timeout=timeout, what=css)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The whole page, not just the window: make the window as tall as the page first.
        height = self.run("return Math.ceil(document.querySelector('main').getBoundingClientRect().bottom + window.scrollY);")
        self._call("POST", self._s("/window/rect"), {"width": 1360, "height": min(max(int(height) + 140, 700), 4000)})
        path.write_bytes(base64.b64decode(self._call("GET", self._s("/screenshot"))))
        return path

    def close(self) -> None:
        try:
            self._call("DELETE", self._s(""))
        except (WebDriverError, httpx.TransportError):
            pass
        self.http.close()
        self.driver.terminate()
        try:
            self.driver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
        shutil.rmtree(self.profile, ignore_errors=True)
