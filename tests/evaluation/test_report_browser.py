"""report.html in a real browser: headless Chromium (Debian's ``chromium``) opens the page of an evaluation with
compare_to next to a training run, over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no
network, no websocket client, no playwright). Checks: no console error or uncaught exception, no resource that
fails to load, the metric table, the loss curve, the samples and their MathML formulas in the rendered DOM,
and a screenshot (``outputs/test-browser/report.png``).

    make test-browser                                    # installs chromium where it is missing, then this
    .venv/bin/python -m pytest -q -m browser             # CHROMIUM=/path/to/chrome picks another binary

Not part of the default run (``-m 'not browser'``), which needs no browser; CI installs Chromium and runs it
after ``make test`` (``.ci/run``).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_report_page import build_evaluation_folder

pytestmark = pytest.mark.browser

SCREENSHOT = Path(__file__).resolve().parents[2] / "outputs" / "test-browser" / "report.png"
BROWSER = os.environ.get("CHROMIUM") or next(
    (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None
)


class Chromium:
    """Headless Chromium driven over the DevTools protocol: JSON messages, NUL-terminated, on fds 3 (in) and 4."""

    def __init__(self, binary: str, profile: Path, width: int = 1400, height: int = 1800):
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def as_fds_3_and_4():  # in the child, before exec
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "--hide-scrollbars"],
            pass_fds=(3, 4), preexec_fn=as_fds_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id, self.events, self.session = b"", 0, [], None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if not select.select([self._read], [], [], max(0.0, deadline - time.time()))[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def open(self, url: str, timeout: float = 30) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.time() + timeout
        while not any(event.get("method") == "Page.loadEventFired" for event in self.events):
            self.events.append(self._message(deadline))

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(f"{details.get('text')} {details.get('exception', {}).get('description', '')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console." + params["type"] + ": " + " ".join(str(a.get("value")) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}")
        return found

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._write)
        os.close(self._read)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if BROWSER is None:
        pytest.skip("no chromium on PATH: `make test-browser` installs it (apt-get install chromium)")
    chromium = Chromium(BROWSER, tmp_path_factory.mktemp("chromium_profile"))
    yield chromium
    chromium.close()


def test_the_report_renders_in_chromium(browser, tmp_path):
    folder, _ = build_evaluation_folder(tmp_path)
    browser.open((folder / "report.html").as_uri())
    # Every lazy image and iframe in: a window as tall as the page, then wait for the images.
    height = browser.evaluate("document.documentElement.scrollHeight")
    browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=height, deviceScaleFactor=1, mobile=False)
    sizes = browser.evaluate(
        "Promise.all([...document.images].map(i => i.complete ? i.naturalWidth : new Promise(r => {"
        "i.onload = () => r(i.naturalWidth); i.onerror = () => r(0); })))"
    )
    assert len(sizes) == 6 and all(sizes), sizes  # the loss curve and every page image, from report_files/
    time.sleep(0.5)  # iframes of pages/ load after the images
    assert browser.problems() == []

    dom = browser.evaluate(
        "({rows: document.querySelectorAll('#metrics tr').length,"
        " before: [...document.querySelectorAll('#metrics th')].some(th => th.textContent === 'before'),"
        " samples: document.querySelectorAll('.sample').length,"
        " curves: document.querySelectorAll('img.loss').length,"
        " marks: document.querySelectorAll('.sample pre.diff del, .sample pre.diff ins').length,"
        " formulas: [...document.querySelectorAll('.formula math')].filter(m => m.getBoundingClientRect().height > 8"
        "   && m.getBoundingClientRect().width > 20).length,"
        " iframes: [...document.querySelectorAll('.sample iframe')].filter(f => f.offsetHeight > 100).length})"
    )
    assert dom["rows"] >= 5 and dom["before"], dom  # header rows, samples, at least a few metrics
    assert dom["samples"] == 4 and dom["curves"] == 1 and dom["marks"] > 4 and dom["iframes"] == 4, dom
    assert dom["formulas"] == 4, dom  # MathML drawn by the browser: reference and prediction of 2 formula crops

    browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=1800, deviceScaleFactor=1, mobile=False)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)  # kept for a person to look at
    shot = browser.screenshot(SCREENSHOT)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000  # more than a blank page
