"""
Headless Chromium driven over the DevTools protocol, for the tests of
zaichik.js and the web console: one page, C{evaluate} (awaiting promises),
C{navigate}, C{wait_for} a condition, C{screenshot}.  Chromium's own
WebSocket (the DevTools one) is spoken with L{zaichik.testing.WebSocketClient}.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any, Optional

from zaichik.testing import WebSocketClient

CHROMIUM = os.environ.get("ZAICHIK_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium misbehaves on a closed network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900"]


def chromium_missing() -> Optional[str]:
    """Why the browser tests cannot run here, or None."""
    if not os.path.exists(CHROMIUM):
        return f"chromium is not installed ({CHROMIUM}; .ci/run installs it with apt-get)"
    return None


class BrowserError(Exception):
    pass


class Browser:
    def __init__(self, timeout: float = 20.0) -> None:
        self.profile = tempfile.mkdtemp(prefix="zaichik-chromium-")
        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._id = 0
        self.console: list = []
        try:
            port = self._devtools_port(timeout)
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout))
            page = next(t for t in targets if t.get("type") == "page")
            path = page["webSocketDebuggerUrl"].split(f":{port}", 1)[1]
            self.ws = WebSocketClient(port, path=path, protocol=None, timeout=timeout)
            self.call("Runtime.enable")
            self.call("Page.enable")
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout: float) -> int:
        path = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrowserError(f"chromium exited with {self.process.returncode}")
            try:
                with open(path) as f:
                    return int(f.readline())
            except (OSError, ValueError):
                time.sleep(0.05)
        raise BrowserError("chromium did not open its DevTools port")

    def call(self, method: str, **params: Any) -> dict:
        self._id += 1
        ask = self._id
        self.ws.sock.sendall(self.ws.encode(json.dumps({"id": ask, "method": method, "params": params}).encode(),
                                            opcode=1))
        while True:
            for _, payload in self.ws.messages():
                message = json.loads(payload)
                if message.get("method") == "Runtime.consoleAPICalled":
                    self.console.append(" ".join(str(a.get("value", a.get("description", "")))
                                                 for a in message["params"]["args"]))
                if message.get("method") == "Runtime.exceptionThrown":
                    self.console.append(json.dumps(message["params"]["exceptionDetails"])[:500])
                if message.get("id") == ask:
                    if "error" in message:
                        raise BrowserError(f"{method}: {message['error']}")
                    return message["result"]

    def evaluate(self, expression: str, timeout: float = 20.0) -> Any:
        """The value of C{expression} (a promise is awaited), as JSON."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                           timeout=int(timeout * 1000))
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression[:80]}: {text}\nconsole: {self.console[-10:]}")
        return result["result"].get("value")

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def wait_for(self, condition: str, timeout: float = 15.0) -> Any:
        """Poll C{condition} in the page until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(condition)
            except BrowserError:
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise BrowserError(f"not within {timeout} s: {condition}\nconsole: {self.console[-10:]}")

    def screenshot(self, path: str) -> str:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
