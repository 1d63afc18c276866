"""A headless Chromium driven through chromedriver's W3C WebDriver protocol (plain HTTP and JSON:
no client library), for tests that open a web UI the way a user does."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1440,1000",
]


def chromium_binaries() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` paths, or None when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One chromedriver process and one browser session with a fresh profile; a context manager."""

    def __init__(self, browser: str, driver: str):
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="drift-chromium-")
        self.proc = subprocess.Popen(
            [driver, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_ready()
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": browser,
                        "args": [*CHROMIUM_ARGS, f"--user-data-dir={self.profile}"],
                    },
                }
            }
        }
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._call("GET", "/status", path_only=True)["ready"]:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"chromedriver did not answer on port {self.port} within {timeout:.0f} s")

    def _call(self, method: str, path: str, body: dict | None = None, path_only: bool = False):
        url = f"http://127.0.0.1:{self.port}{path}"
        data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"WebDriver {method} {path}: {exc.read()[:500]!r}") from exc

    def _session(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def text(self) -> str:
        """The visible text of the page."""
        return self._session(
            "POST", "/execute/sync", {"script": "return document.body.innerText", "args": []}
        )

    def wait_for_text(self, *needles: str, timeout: float = 60.0) -> str:
        """The page text once it holds every needle (the UI renders after its API calls return)."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text() or ""
            if all(n in text for n in needles):
                return text
            time.sleep(0.5)
        missing = [n for n in needles if n not in text]
        raise AssertionError(f"page {self.url()} never showed {missing}; it shows:\n{text[:3000]}")

    def hrefs(self, contains: str) -> list[str]:
        """The ``href`` of every link whose address contains ``contains``."""
        script = (
            "return Array.from(document.querySelectorAll('a')).map(a => a.href)"
            ".filter(h => h && h.includes(arguments[0]))"
        )
        return self._session("POST", "/execute/sync", {"script": script, "args": [contains]})

    def url(self) -> str:
        return self._session("GET", "/url")

    def local_storage(self, key: str) -> str | None:
        return self._session(
            "POST",
            "/execute/sync",
            {"script": "return window.localStorage.getItem(arguments[0])", "args": [key]},
        )

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the browser may be gone already
            self._session("DELETE", "")
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
