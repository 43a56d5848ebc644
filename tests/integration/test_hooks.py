"""The hooks a predictor may define or ask for: health() (an unhealthy replica leaves the routes and is loaded again),
metrics (counters, gauges and histograms merged into /metrics from every process), and warm-up samples (run before
a replica counts as ready; a failing one fails the load, named)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
from harness import Daemon, wait_until

HEALTHY = '''
import os
import uuid


class PythonPredictor:
    def __init__(self, config, predictor_dir):
        self.dir = predictor_dir
        self.instance = uuid.uuid4().hex

    def predict(self, payload):
        return {"pid": os.getpid(), "instance": self.instance}

    def health(self):
        return not os.path.exists(os.path.join(self.dir, f"sick-{os.getpid()}"))
'''

COUNTING = '''
import os


class PythonPredictor:
    def __init__(self, config, metrics):
        self.hits = metrics.counter("hits_total", "Requests by kind.", labels=["kind"])
        self.size = metrics.histogram("payload_size", "Items per payload.", buckets=[1, 2, 4, 8])
        self.last = metrics.gauge("last_size", "The last payload's size.", mode="max")

    def predict(self, payload):
        self.hits.labels(kind=payload["kind"]).inc()
        self.size.observe(len(payload["items"]))
        self.last.set(len(payload["items"]))
        return {"pid": os.getpid()}
'''

MISUSED = '''
class PythonPredictor:
    def __init__(self, config, metrics):
        self.c = metrics.counter("requests_total", "Requests.", labels=["api"])

    def predict(self, payload):
        return 1
'''

WARMED = '''
class PythonPredictor:
    def __init__(self, config):
        self.seen = []

    def predict(self, payload):
        if isinstance(payload, dict) and payload.get("bad"):
            raise ValueError("a sample it cannot take")
        self.seen.append(payload)
        return {"seen": len(self.seen), "first": self.seen[0]}
'''

WARMED_BATCHES = '''
class PythonPredictor:
    def __init__(self, config):
        self.sizes = []

    def predict(self, payload):
        if len(payload) > 4:
            raise MemoryError(f"no room for a batch of {len(payload)}")
        self.sizes.append(len(payload))
        return [self.sizes for _ in payload]
'''


def test_an_unhealthy_replica_leaves_the_routes_and_is_loaded_again(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"h/predictor.py": HEALTHY, "h/predictor.toml": "[serving]\nreplicas = 2\nhealth_interval = 0.3\n"
                     "health_failures = 3\n"}, "[workers]\ncpu = 2\n")
    status = d.wait_replicas("h", 2)
    pids = sorted(r["pid"] for r in status["apis"]["h"]["replicas"])
    assert len(pids) == 2
    sick, well = pids
    (d.predictors / "h" / f"sick-{sick}").touch()
    out = wait_until(lambda: (a := d.get("/h").json())["unhealthy"] and a, 30, "the sick replica marked")
    assert out["unhealthy"][0]["pid"] == sick and out["unhealthy"][0]["problem"]["message"] == "health() returned False"
    assert out["state"] == "ready" and d.get("/readyz?api=h").status_code == 200, "the other replica serves"
    answers = {d.post("/h", json={}, headers={"Connection": "close"}).json()["pid"] for _ in range(30)}
    assert answers == {well}, "no request goes to the unhealthy replica"
    d.wait_for_log(r"API h version \w+: health check failed \(3 in a row\): health\(\) returned False; loading it "
                   r"again", 30)
    loads = rf"model worker cpu \(pid {sick}\): API h version \w+ loaded in"
    wait_until(lambda: len(re.findall(loads, d.logs())) >= 2, 30, "the sick replica loaded again in its worker")
    (d.predictors / "h" / f"sick-{sick}").unlink()
    back = wait_until(lambda: not (a := d.get("/h").json())["unhealthy"] and a, 30, "healthy again")
    assert sorted(r["pid"] for r in back["replicas"]) == pids, "both replicas in the routes again"
    assert len(re.findall(rf"model worker cpu \(pid {well}\): API h version \w+ loaded in", d.logs())) == 1, \
        "the well replica was never loaded again"
    events = [e["text"] for e in d.status()["events"] if e["kind"] == "unhealthy"]
    assert any("loading it again" in e for e in events), events


def test_an_api_whose_only_replica_is_unhealthy_answers_503_and_fails_its_check(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"h/predictor.py": HEALTHY, "h/predictor.toml": "[serving]\nhealth_interval = 0.3\n"
                     "health_failures = 1000\n"})
    pid = d.wait_settled()["apis"]["h"]["replicas"][0]["pid"]
    (d.predictors / "h" / f"sick-{pid}").touch()
    wait_until(lambda: d.get("/h").json()["state"] == "unhealthy", 30, "unhealthy")
    r = d.post("/h", json={})
    assert r.status_code == 503 and "is unhealthy" in r.json()["error"] and "health() returned False" in r.json()[
        "error"]
    assert d.get("/readyz?api=h").status_code == 503
    (d.predictors / "h" / f"sick-{pid}").unlink()
    wait_until(lambda: d.post("/h", json={}).status_code == 200, 30, "serving again once healthy")
    assert d.get("/readyz?api=h").status_code == 200


def test_user_metrics_are_merged_exactly_across_http_and_model_workers(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"m.py": COUNTING, "m.toml": "[serving]\nreplicas = 2\n"}, "[workers]\ncpu = 2\n")
    d.wait_replicas("m", 2)
    pids = set()
    for i in range(40):  # a connection each: both HTTP workers, both model workers
        r = httpx.post(d.url("/m"), json={"kind": "a" if i % 4 else "b", "items": [0] * (i % 5)})
        pids.add(r.json()["pid"])
    assert len(pids) == 2, "both replicas counted"
    text = d.get("/metrics").text
    assert 'predictord_user_hits_total{api="m",kind="a"} 30.0' in text, text[-2000:]
    assert 'predictord_user_hits_total{api="m",kind="b"} 10.0' in text
    assert 'predictord_user_payload_size_count{api="m"} 40.0' in text
    assert 'predictord_user_payload_size_sum{api="m"} 80.0' in text
    assert 'predictord_user_payload_size_bucket{api="m",le="2.0"} 24.0' in text
    assert 'predictord_user_last_size{api="m"} 4.0' in text


def test_misused_metrics_are_a_load_error_with_the_line(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"bad.py": MISUSED})
    error = d.wait_settled()["apis"]["bad"]["error"]
    assert error["file"] == str(d.predictors / "bad.py") and error["line"] == 4, error
    assert re.search(r"__init__ raised MetricsError: counter predictord_user_requests_total: label 'api' is the "
                     r"daemon's", error["message"]), error


def test_warm_up_samples_run_before_ready_and_a_failing_one_fails_the_load(
        make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = make_daemon({"w/predictor.py": WARMED, "w/predictor.toml": '[serving]\nwarmup = ["samples/cat.json", '
                     '"samples/hello.txt"]\n', "w/samples/cat.json": '{"animal": "cat"}',
                     "w/samples/hello.txt": "hello",
                     "b/predictor.py": WARMED, "b/predictor.toml": '[serving]\nwarmup = ["samples/ok.json", '
                     '"samples/bad.json"]\n', "b/samples/ok.json": "{}", "b/samples/bad.json": '{"bad": true}',
                     "k/predictor.py": WARMED_BATCHES, "k/predictor.toml": '[serving]\nmax_batch_size = 4\n'
                     'warmup = ["s.json"]\n', "k/s.json": "{}",
                     "m/predictor.py": WARMED_BATCHES, "m/predictor.toml": '[serving]\nmax_batch_size = 6\n'
                     'warmup = ["s.json"]\n', "m/s.json": "{}"})
    status = d.wait_settled()
    assert d.post("/w", json={"animal": "dog"}).json() == {"seen": 3, "first": {"animal": "cat"}}, \
        "both samples ran through predict() before the first request"
    error = status["apis"]["b"]["error"]
    assert status["apis"]["b"]["state"] == "failed"
    assert error["message"].startswith("warm-up sample samples/bad.json: predict() raised ValueError: a sample it "
                                       "cannot take"), error
    assert error["file"] == str(d.predictors / "b" / "predictor.py") and error["line"] == 8, error
    assert d.post("/k", json={}).json() == [1, 2, 4, 1], "a batch of 1 a sample, then each size up to the largest"
    assert status["apis"]["m"]["state"] == "failed", "a batch as large as it may run fails at load, not under load"
    assert status["apis"]["m"]["error"]["message"].startswith(
        "warm-up batch of 6 (the samples in turn): predict() raised MemoryError: no room for a batch of 6"), status
