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
    shot = tmp_path / "status.png"
    try:
        out = subprocess.run(["node", str(BROWSER / "page.js"), d.url("/"), str(shot), "alpha,beta,nasty,raiser"],
                             capture_output=True, text=True, timeout=120, cwd=BROWSER,
                             env={**os.environ, "NODE_PATH": str(NODE_MODULES)})
    finally:
        stop.set()
        t.join(30)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "fatal" not in result, result
    assert result["errors"] == [], "no console errors, no alert() from a predictor's string"
    assert result["injected"] == 0
    assert "<script>alert(2)</script>" in result["text"], "the error text is shown as text"
    for name in ("alpha", "beta", "nasty"):
        assert name in result["text"]
    raised = f"last request error: {d.predictors / 'raiser.py'}:4: predict() raised ValueError: no such label: 42"
    assert raised in result["text"], "a request-time error shows with the user's file and line"
    assert "host: CPU" in result["text"] and "No GPUs: running on the CPU." in result["text"], "the devices section"
    assert "Rebalancing" in result["text"]
    assert result["chartPointsAfter"] >= 2 and result["chartPointsAfter"] > result["chartPointsBefore"]
    assert shot.stat().st_size > 10_000
