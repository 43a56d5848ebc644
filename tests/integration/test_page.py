"""The status page in a real headless browser (Debian's chromium, driven by playwright-core)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from broken import OK
from harness import Daemon

BROWSER = Path(__file__).resolve().parents[1] / "browser"
NODE_MODULES = Path(__file__).resolve().parents[2] / ".browser" / "node_modules"  # `make browser-deps`
NASTY = '''
class PythonPredictor:
    def __init__(self, config):
        raise RuntimeError("<b>bold</b><img src=x onerror=alert(1)><script>alert(2)</script>")

    def predict(self, payload):
        return 1
'''

RAISER = '''
class PythonPredictor:
    def predict(self, payload):
        raise ValueError("no such label: 42")
'''

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not Path("/usr/bin/chromium").exists()
    or not (NODE_MODULES / "playwright-core").exists(),
    reason="needs node, /usr/bin/chromium and playwright-core: make browser-deps (.ci/run runs it)")


def test_status_page_shows_every_api_escapes_their_strings_and_charts_traffic(
        make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = make_daemon({"alpha.py": OK, "beta.py": OK, "nasty.py": NASTY, "raiser.py": RAISER})
    d.wait_settled()
    assert d.post("/raiser", json={}).status_code == 500
    page = d.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.headers["content-type"] == "text/html; charset=utf-8" and "<svg" not in page.text
    assert d.get("/").headers["content-type"] == "application/json", "curl and scripts still get JSON"
    stop = threading.Event()

    def traffic() -> None:  # bounded: it stops when the browser is done, or after 60 s
        with httpx.Client(timeout=10) as c:
            for _ in range(6000):
                if stop.wait(0.01):
                    return
                c.post(d.url("/alpha"), json={})

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    shots = [tmp_path / "status-desktop.png", tmp_path / "status-phone.png"]
    try:
        out = subprocess.run(["node", str(BROWSER / "page.js"), d.url("/"), *map(str, shots),
                              "alpha,beta,nasty,raiser", "raiser", "raiser"],
                             capture_output=True, text=True, timeout=150, cwd=BROWSER,
                             env={**os.environ, "NODE_PATH": str(NODE_MODULES)})
    finally:
        stop.set()
        t.join(30)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "fatal" not in result, result
    assert result["errors"] == [], "no console errors, no alert() from a predictor's string"
    assert result["injected"] == 0
    text = result["desktopText"]
    assert "<script>alert(2)</script>" in text, "the error text is shown as text"
    for name in ("alpha", "beta", "nasty", "raiser"):
        assert name in text and name in result["phoneText"]
    raised = f"last request error: {d.predictors / 'raiser.py'}:4: predict() raised ValueError: no such label: 42 ("
    assert raised in text, "a request-time error shows with the user's file, line and time"
    assert "No GPUs: running on the CPU." in text and "memory: ours" in text, "the devices, with memory bars"
    assert "Rebalancing" in text
    # charts: a time axis, units, one scale per metric over every API, and values on hover
    assert result["chartPointsAfter"] >= 2 and result["chartPointsAfter"] > result["chartPointsBefore"]
    assert {"-10 min", "-5 min", "now"} <= set(result["axis"]) and any("req/s" in a for a in result["axis"])
    assert len(set(result["scales"])) == 1, "every API's requests chart has the same scale"
    assert "requests/s" in result["hover"] and "req/s" in result["hover"], result["hover"]
    # the detail view of an API, and the events of one API
    assert "versions" in result["details"] and "settings" in result["details"] and "replicas" in result["details"]
    assert result["detailCharts"] == ["batch size", "outstanding", "errors"]
    assert result["filtered"] and set(result["filtered"]) == {"raiser"}, result["filtered"]
    # a phone: nothing wider than the screen; an event's kind on one line (not "loa / d")
    assert result["phoneOverflow"] <= 0, result["phoneOverflow"]
    assert result["phoneKindLines"] and set(result["phoneKindLines"]) == {1}, result["phoneKindLines"]
    for shot in shots:
        assert shot.stat().st_size > 10_000
    if os.environ.get("PREDICTORD_DOCS_SCREENSHOTS"):  # how docs/status-*.png are made
        for shot in shots:
            shutil.copy(shot, Path(__file__).resolve().parents[2] / "docs" / shot.name)
