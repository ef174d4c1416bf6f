"""Headless Chromium driven over the DevTools protocol (no extra test dependency).

Debian's `chromium` with the flags ENVIRONMENT.md gives; the protocol through the `websockets`
package Prefect already depends on. Enough to open a page, wait for text, click a tab by its
label and take a screenshot.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1400,1000",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


ARTIFACTS_DIR = Path("state/test-artifacts")  # screenshots kept after the test (CI uploads)


def keep(shot: Path) -> None:
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS_DIR / shot.name)


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium with a fresh profile; use as a context manager."""

    def __init__(self, start_timeout_s: float = 60.0):
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        cmd = [chromium_path(), *FLAGS, f"--user-data-dir={self.profile}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ids = itertools.count(1)
        self.ws = self._connect(start_timeout_s)

    def _connect(self, timeout_s: float):
        from websockets.sync.client import connect

        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            [page] = [t for t in json.loads(r.read()) if t["type"] == "page"][:1]
        return connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)

    def call(self, method: str, **params):
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout_s: float = 90.0) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                missing = [n for n in needles if n not in text]
                raise AssertionError(f"page never showed {missing}; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def click_text(self, label: str) -> None:
        """Click the innermost visible element whose own text is exactly `label`."""
        found = self.evaluate(
            """((label) => {
              const all = [...document.querySelectorAll('button, a, [role=tab], li, span, div')];
              const hits = all.filter(e => e.innerText && e.innerText.trim() === label
                                           && e.offsetParent !== null);
              if (!hits.length) return false;
              hits[hits.length - 1].click();
              return true;
            })"""
            + f"({json.dumps(label)})"
        )
        if not found:
            raise AssertionError(f"nothing labelled {label!r} to click")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.ws.close()
        except Exception:
            pass  # already gone
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
