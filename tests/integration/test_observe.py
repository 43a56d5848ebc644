"""Metrics and status against a real multi-worker daemon: exact counts for every kind of answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
from broken import OK
from harness import Daemon, wait_until
from prometheus_client.parser import text_string_to_metric_families

TORCH_PRELOADED = True  # the model path, as production runs it (harness.TORCH)

PREDICTOR = '''
import time

from starlette.exceptions import HTTPException


class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        kind = payload["kind"]
        if kind == "bad":
            raise HTTPException(status_code=422, detail="no")
        if kind == "crash":
            raise RuntimeError("boom")
        if kind == "slow":
            time.sleep(1.5)
        return {"ok": kind}
'''

EXPECTED = {"200": 20, "400": 2, "422": 5, "500": 3, "504": 2}


def samples(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = d.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            out[key] = out.get(key, 0.0) + s.value
    return out


def value(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in m.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_and_status_count_every_answer_exactly(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"m.py": PREDICTOR, "m.toml": "[serving]\ntimeout = 1\n", "other.py": OK}, "[workers]\ncpu = 2\n")
    status = d.wait_settled()

    def post(path: str, **kw: Any) -> int:
        with httpx.Client(timeout=30) as c:  # a new connection each time: both HTTP workers take some
            return c.post(d.url(path), **kw).status_code

    codes = [post("/m", json={"kind": "ok"}) for _ in range(20)]
    codes += [post("/m", json={"kind": "bad"}) for _ in range(5)]
    codes += [post("/m", json={"kind": "crash"}) for _ in range(3)]
    codes += [post("/m", content=b"{", headers={"Content-Type": "application/json"}) for _ in range(2)]
    codes += [post("/m", json={"kind": "slow"}) for _ in range(2)]
    codes += [post("/nope", json={}) for _ in range(3)]
    assert sorted(codes) == sorted([200] * 20 + [422] * 5 + [500] * 3 + [400] * 2 + [504] * 2 + [404] * 3)
    wait_until(lambda: d.get("/m").json()["outstanding"] == 0, 30, "the slow jobs to finish")

    def flushed() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        s = samples(d)  # workers flush their tallies about once a second
        done = value(s, "predictord_request_duration_seconds_count", api="m") == 32
        done = done and value(s, "predictord_predict_seconds_count", api="m") == 30
        done = done and value(s, "predictord_requests_total", api="-") == 3  # the /nope ones came last
        return s if done else None

    m = wait_until(flushed, 10, "the workers to flush their counts")
    for code, n in EXPECTED.items():
        assert value(m, "predictord_requests_total", api="m", code=code) == n, code
    assert value(m, "predictord_requests_total", api="m", **{"class": "5xx"}) == 5
    assert value(m, "predictord_requests_total", api="-", code="404") == 3
    assert value(m, "predictord_request_duration_seconds_count", api="m") == 32
    assert value(m, "predictord_request_duration_seconds_bucket", api="m", le="+Inf") == 32
    assert value(m, "predictord_request_duration_seconds_bucket", api="m", le="0.5") == 30, "the 504s took ~1 s"
    for name in ("predictord_queue_wait_seconds_count", "predictord_predict_seconds_count",
                 "predictord_batch_size_count", "predictord_batch_size_sum"):
        assert value(m, name, api="m") == 30, name  # every request that reached a model worker, once: not the 400s
    assert value(m, "predictord_in_flight_requests", api="m") == 0
    assert value(m, "predictord_queued_requests", api="m") == 0
    assert value(m, "predictord_replicas", api="m", state="ready") == 1
    assert value(m, "predictord_loads_total", api="m", kind="load", result="ok") == 1
    assert value(m, "predictord_workers", kind="model") == 2

    cmd = [sys.executable, "-m", "predictord", "status", "--config", str(d.config_path)]

    def stats() -> dict[str, Any] | None:
        out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=30)
        s = json.loads(out.stdout)["apis"]["m"]["stats"]
        return s if s["codes"] == EXPECTED else None

    s = wait_until(stats, 20, "status --json to show the same counts")
    assert s["requests"] == 32 and s["errors"] == 5 and s["p50_ms"] is not None

    victim = status["apis"]["other"]["replicas"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: value(samples(d), "predictord_worker_restarts_total", kind="model", cause="SIGKILL") == 1, 30,
               "the restart to be counted with its cause")
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    assert "RESTARTS" in table and "RECENT EVENTS" in table and "was killed by SIGKILL" in table
    m_line = next(line for line in table.splitlines() if line.startswith("m "))
    assert "ready" in m_line


def test_access_log_in_json_names_api_status_latency_request_and_worker(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"m.py": PREDICTOR}, '[server]\naccess_log = true\nlog_format = "json"\n')
    d.wait_settled()
    assert d.post("/m", json={"kind": "ok"}, headers={"X-Request-ID": "acc-1"}).status_code == 200
    assert d.post("/m", json={"kind": "bad"}, headers={"X-Request-ID": "acc-2"}).status_code == 422
    d.wait_for_log(r'"request_id": "acc-2"')
    events = [json.loads(line) for line in d.logs().splitlines() if line.startswith("{")]
    assert events and all({"time", "level", "pid", "role", "logger", "message"} <= set(e) for e in events)
    access = {e["request_id"]: e for e in events if e["logger"] == "predictord.access"}
    assert access["acc-1"]["api"] == "m" and access["acc-1"]["status"] == 200 and access["acc-1"]["ms"] > 0
    assert access["acc-2"]["status"] == 422 and access["acc-2"]["role"] in ("http0", "http1")
    assert any(e["logger"] == "predictord.master" and "ready on model worker" in e["message"] for e in events)
