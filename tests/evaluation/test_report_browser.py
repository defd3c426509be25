"""report.html in a real browser: headless Chromium (Debian's ``chromium``) opens the page of an evaluation with
compare_to next to a training run, over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no
network, no websocket client, no playwright). Checks: no console error or uncaught exception, no resource that
fails to load, the metric table, the loss curve, the samples and their MathML formulas in the rendered DOM, the
page's style and toggles under its Content-Security-Policy, and a screenshot (``outputs/test-browser/report.png``).
Then hostile answers: LaTeX carrying markup, through a dataset's references (a tiny model evaluated) and through
an ``eval.predictions`` file, must run nothing; script injected into a page past the sanitizer is blocked by the
policy.

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
from eval_helpers import save_tiny_checkpoint
from test_report_page import build_evaluation_folder

from granite_docling.evaluation.records import Record, write_predictions
from granite_docling.tools.sample_data import write_sample_data

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
        """Load ``url``; :meth:`problems` then covers this page only."""
        self.events = []
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

    # Under the page's policy its own stylesheet applies (by hash) and the <details> toggles work (no script).
    features = browser.evaluate(
        "(() => { const closed = [...document.querySelectorAll('details')].filter(d => !d.open);"
        " closed[0].querySelector('summary').click();"
        " return {styled: getComputedStyle(document.querySelector('.card')).borderTopStyle,"
        "  closed: closed.length, opened: closed[0].open}; })()"
    )
    assert features == {"styled": "solid", "closed": features["closed"], "opened": True} and features["closed"] > 4

    browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=1800, deviceScaleFactor=1, mobile=False)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)  # kept for a person to look at
    shot = browser.screenshot(SCREENSHOT)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000  # more than a blank page


BOX = "<loc_10><loc_20><loc_30><loc_40>"
CRAFTED = [  # each would set the title if any of it ran
    "x = \\text{<img/src/onerror=document.title='X'>}",
    "x = \\text{<script>document.title='X'</script>}",
    "\\text{<svg onload=document.title='X'>}",
    "\\text{<math href=javascript:document.title='X'>m</math>}",
    "\\text{<svg><a xlink:href=javascript:document.title='X'><text y=9>a</text></a></svg>}",
    "\\text{<iframe srcdoc=<script>parent.document.title='X'</script>>}",
    "\\href{javascript:document.title='X'}{y}",  # latex2mathml's own link
    "\\style{background:red}{y}",
]
RAN_NOTHING = (
    "(() => { document.querySelectorAll('.formula *').forEach(e => e.dispatchEvent(new MouseEvent('click',"
    " {bubbles: true, cancelable: true})));"
    " const all = [...document.querySelectorAll('*')];"
    " return {title: document.title, scripts: document.scripts.length,"
    "  handlers: all.filter(e => [...e.attributes].some(a => /^on/i.test(a.name))).length,"
    "  links: all.filter(e => [...e.attributes].some(a => /href$/i.test(a.name)"
    "   && /^\\s*javascript:/i.test(a.value))).length,"
    "  foreign: document.querySelectorAll('.formula :not(math, math *), .formula svg, .formula a').length,"
    "  formulas: document.querySelectorAll('.formula math').length,"
    "  texts: [...document.querySelectorAll('.formula mtext')].map(m => m.textContent)}; })()"
)


@pytest.fixture(scope="module")
def crafted_pages(tmp_path_factory) -> dict[str, Path]:
    """report.html of the crafted answers by both routes: as a dataset's references, evaluated with a tiny model
    (its page answer rendered from report_files/, eval.page_exports=false), and as the predictions and references
    of an eval.predictions file."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from granite_docling.evaluation.config import register_eval_configs, validate_eval
    from granite_docling.evaluation.runner import evaluate

    root = tmp_path_factory.mktemp("crafted")
    data = root / "data"
    write_sample_data(data, pages=1, formulas=len(CRAFTED), seed=3, qa_turns=1)
    for path, latex in zip(sorted((data / "anns" / "train").glob("synth_formula_*.json")), CRAFTED, strict=True):
        annotation = json.loads(path.read_text())
        annotation["anns"]["assistant"] = f"{BOX}{latex}</formula>"
        path.write_text(json.dumps(annotation))
    image = next((data / "images" / "train").glob("synth_formula_*.png"))
    answers = [f"{BOX}{latex}</formula>" for latex in CRAFTED]
    records = [Record(f"f{i}", "crafted", None, "", a, a, True, [str(image)]) for i, a in enumerate(answers)]
    write_predictions(root / "predictions.jsonl", records)

    register_eval_configs()
    common = ["dataset=[sample]", f"dataset.sample.path={data}", "eval.split=all", "eval.num_examples=20",
              "eval.docling_eval_export=false"]  # fmt: skip
    routes = {
        "dataset": [f"checkpoint={save_tiny_checkpoint(root / 'model')}", "eval.max_new_tokens=4",
                    "eval.page_exports=false"],
        "predictions": [f"eval.predictions={root / 'predictions.jsonl'}"],
    }  # fmt: skip
    pages = {}
    for route, overrides in routes.items():
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
            cfg = OmegaConf.to_object(compose(config_name="evaluate", overrides=common + overrides))
        validate_eval(cfg)
        evaluate(cfg, root / route)
        pages[route] = root / route / "report.html"
    return pages


@pytest.mark.parametrize("route", ["dataset", "predictions"])
def test_crafted_answers_run_no_script(browser, crafted_pages, route):
    page = crafted_pages[route]
    browser.open(page.as_uri())
    time.sleep(0.5)  # lazy frames and images
    found = browser.evaluate(RAN_NOTHING)
    time.sleep(0.3)  # anything a click set off
    assert (
        browser.evaluate("document.title")
        == found["title"]
        == "Evaluation: "
        + (str(page.parents[1] / "model") if route == "dataset" else str(page.parents[1] / "predictions.jsonl"))
    )
    assert (found["scripts"], found["handlers"], found["links"], found["foreign"]) == (0, 0, 0, 0), found
    # Every crafted formula drawn as MathML (reference, and prediction on the predictions route) with its
    # markup as visible text; nothing blocked by the policy either, since nothing was there to block.
    assert found["formulas"] == len(CRAFTED) * (2 if route == "predictions" else 1), found
    assert "<img/src/onerror=document.title='X'>" in found["texts"], found["texts"]
    assert "<script>document.title='X'</script>" in found["texts"], found["texts"]
    assert browser.problems() == []
    if route == "dataset":  # the page reference, exported into report_files/ and framed (no pages/ exports)
        frames = browser.evaluate(
            "[...document.querySelectorAll('iframe')].map(f => [f.getAttribute('src'), f.offsetHeight > 100])"
        )
        assert frames == [["report_files/pages/sample/anns_train_synth_doc_00000/reference.html", True]], frames
        assert (page.parent / frames[0][0]).is_file()


def test_the_policy_blocks_script_the_page_did_not_ship(browser, crafted_pages):
    """Script put into a page past the sanitizer: the Content-Security-Policy alone stops it."""
    page = crafted_pages["predictions"]
    injected = page.with_name("injected.html")
    injected.write_text(
        page.read_text().replace(
            "<body>",
            "<body><script>document.title='X'</script><img src=x onerror=\"document.title='X'\">"
            "<svg onload=\"document.title='X'\"></svg><a id=js href=\"javascript:document.title='X'\">js</a>",
            1,
        )
    )
    browser.open(injected.as_uri())
    browser.evaluate("document.getElementById('js').click()")
    time.sleep(0.5)
    assert browser.evaluate("document.title") == f"Evaluation: {page.parents[1] / 'predictions.jsonl'}"
    blocked = [p for p in browser.problems() if "Content Security Policy" in p]
    assert len(blocked) >= 3, browser.problems()  # the script, the two handlers and the javascript: link
    assert browser.evaluate("getComputedStyle(document.querySelector('.card')).borderTopStyle") == "solid"
