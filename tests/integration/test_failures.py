"""Broken predictors, dying workers, deadlines and full queues: each gets a clear answer, nothing else breaks."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from broken import BROKEN, EXIT, HANG, OK, SLOW
from harness import wait_until


def test_broken_predictors_report_errors_and_others_keep_serving(make_daemon: Any) -> None:
    files = {f"{name}.py": src for name, (src, _, _) in BROKEN.items()}
    bad_toml = {"badtoml.py": OK, "badtoml.toml": '[serving]\ndevice = "tpu"\n'}
    d = make_daemon({**files, "ok.py": OK, "hang.py": HANG, **bad_toml},
                    "[predictors]\nload_timeout = 8\n[workers]\ncpu = 2\n")
    status = d.wait_settled(90)
    assert d.post("/ok", json={}).json() == {"ok": True}
    for name, (_, message, line) in BROKEN.items():
        api = status["apis"][name]
        assert api["state"] == "failed", name
        error = api["error"]
        assert error["file"].endswith(f"{name}.py"), error
        assert re.search(message, error["message"]), error
        if line is not None:
            assert error["line"] == line, error
        r = d.post(f"/{name}", json={})
        assert r.status_code == 503 and r.headers["content-type"] == "application/json"
        assert f"{name}.py" in r.json()["error"]
        d.wait_for_log(rf"API {name} version \w+ is broken|API {name} version \w+ failed to load")
    hang = status["apis"]["hang"]
    assert hang["state"] == "failed" and "load deadline (8s)" in hang["error"]["message"]
    assert hang["error"]["file"] == str(d.predictors / "hang.py"), "the user's file, not the daemon's copy"
    toml = status["apis"]["badtoml"]["error"]
    assert toml["message"].startswith("[serving]: device: expected one of"), toml  # its file once, as the file
    assert toml["file"] == str(d.predictors / "badtoml.toml"), toml
    assert d.post("/badtoml", json={}).json()["error"].startswith(
        f"API 'badtoml' failed to load: {d.predictors / 'badtoml.toml'}: [serving]: device: expected one of")
    d.wait_for_log(r"API hang version \w+: __init__ exceeded 8s")
    # the daemon says it ended the worker itself, and why: not "killed by SIGKILL (out of memory?)"
    said = rf"pid \d+ was killed by the daemon: a load ran past \[predictors\] load_timeout \(API hang version " \
           rf"{hang['version']['wanted']}\)"
    wait_until(lambda: any(re.search(said, e["text"]) for e in d.status()["events"] if e["kind"] == "restart"), 30,
               "the restart event")
    # the worker killed for the hang is replaced, and the good API still answers everywhere
    wait_until(lambda: d.status()["apis"]["ok"]["state"] == "ready", 30, "ok to be ready again")
    assert d.post("/ok", json={}).status_code == 200
    # APIs failed for their own files leave the host ready for a balancer; each fails its own check
    ready = wait_until(lambda: (r := d.get("/readyz")).status_code == 200 and r.json(), 30, "the host settled")
    assert ready["failed"] == {name: "failed" for name in [*BROKEN, "hang", "badtoml"]}
    for name in [*BROKEN, "hang", "badtoml"]:
        assert d.get(f"/readyz?api={name}").status_code == 503
    assert d.get("/readyz?api=ok").json() == {"ready": True, "api": "ok", "replicas": 1}


def test_a_predictor_deleted_while_its_init_hangs_does_not_wedge_its_worker(make_daemon: Any) -> None:
    """The load deadline holds whatever happened to the API: deleted while its __init__ hangs, its worker is still
    killed at the deadline, so the worker's one load slot frees and an API added afterwards is served."""
    timeout = 4
    d = make_daemon({"hang.py": HANG}, f"[predictors]\nload_timeout = {timeout}\ndebounce = 0.2\n")
    d.wait_for_log(r"loading API hang version \w+ on model worker 0")
    (d.predictors / "hang.py").unlink()
    d.wait_for_log(r"API hang was removed")
    d.write("ok.py", OK)
    wait_until(lambda: d.post("/ok", json={}).status_code == 200, timeout + 30, "ok to be served")
    d.wait_for_log(rf"API hang version \w+: __init__ exceeded {timeout}s on model worker 0; killing the worker")
    assert d.get("/hang").status_code == 404


CYCLIC = '''
class PythonPredictor:
    def __init__(self, config):
        self.me = self  # a reference cycle: only a garbage collection frees it
        self.weights = bytearray(300 * 2**20)
        for i in range(0, len(self.weights), 4096):
            self.weights[i] = 1  # resident

    def predict(self, payload):
        raise MemoryError("no room for this batch")
'''


def test_a_failed_load_gives_back_what_it_allocated(make_daemon: Any) -> None:
    d = make_daemon({"ok.py": OK}, "[workers]\ncpu = 1\n")
    worker = psutil.Process(d.wait_settled()["workers"][0]["pid"])
    before = worker.memory_info().rss
    d.write("big/s.json", "{}")
    d.write("big/predictor.toml", '[serving]\nmax_batch_size = 4\nwarmup = ["s.json"]\n')
    d.write("big/predictor.py", CYCLIC)
    wait_until(lambda: d.status()["apis"].get("big", {}).get("state") == "failed", 60, "the load of big to fail")
    assert "warm-up sample s.json: predict() raised MemoryError" in d.status()["apis"]["big"]["error"]["message"]
    wait_until(lambda: worker.memory_info().rss < before + 100 * 2**20, 20, "its 300 MB given back by its worker")
    assert worker.pid == d.status()["workers"][0]["pid"] and d.post("/ok", json={}).json() == {"ok": True}


def test_predict_that_kills_its_worker_gets_502_and_worker_is_replaced(make_daemon: Any) -> None:
    d = make_daemon({"exit.py": EXIT, "exit.toml": '[serving]\ndevice = "cpu"\n', "ok.py": OK},
                    "[workers]\ncpu = 2\n")
    d.wait_settled()
    before = d.worker_pids()
    r = d.post("/exit", json={"die": True})
    assert r.status_code == 502
    assert re.search(r"its own code ended model worker \d \(os._exit\(3\)\) while handling this request",
                     r.json()["error"]), r.json()
    d.wait_for_log(r"model worker \d \(cpu\) pid \d+ exited with status 3")
    assert d.post("/ok", json={}).status_code == 200
    def replaced() -> bool:
        s = d.status()  # one snapshot: the state and the pids must come from the same routing table
        pids = {w["slot"]: w["pid"] for w in s["workers"]}
        return s["apis"]["exit"]["state"] == "ready" and pids != before

    wait_until(replaced, 30, "a replacement worker with exit loaded")
    assert d.post("/exit", json={}).json() == {"alive": True}


def test_sigkilled_worker_fails_its_running_request_at_once_and_sends_the_queued_ones_on(make_daemon: Any) -> None:
    """Only the request inside predict() fails (at once, not at its deadline); the two the worker had received but
    not started are sent again, to its replacement, and answered there."""
    d = make_daemon({"slow.py": SLOW, "ok.py": OK}, "[workers]\ncpu = 2\n")
    status = d.wait_settled()
    slow_pid = status["apis"]["slow"]["replicas"][0]["pid"]
    ok_pid = status["apis"]["ok"]["replicas"][0]["pid"]
    assert slow_pid != ok_pid, "placement spreads two APIs over two workers"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = pool.submit(d.post, "/slow", json={"sleep": 30})
        wait_until(lambda: d.get("/slow").json()["outstanding"] == 1, 10, "1 request in predict() on slow")
        queued = [pool.submit(d.post, "/slow", json={"sleep": 0}) for _ in range(2)]
        wait_until(lambda: d.get("/slow").json()["outstanding"] == 3, 10, "2 more queued behind it")
        started = time.monotonic()
        os.kill(slow_pid, signal.SIGKILL)
        lost = running.result(timeout=20)
        answers = [f.result(timeout=30) for f in queued]
        waited = time.monotonic() - started
        assert lost.status_code == 502 and "exited while handling this request" in lost.json()["error"]
        assert [a.json() for a in answers] == [{"slept": 0}, {"slept": 0}], "the queued ones ran on the replacement"
        assert waited < 20  # failed at once, not at the 30 s predict or the 60 s deadline
        assert all(d.post("/ok", json={}).status_code == 200 for _ in range(20))
    d.wait_for_log(rf"model worker \d \(cpu\) pid {slow_pid} was killed by SIGKILL")
    wait_until(lambda: d.get("/slow").json()["state"] == "ready", 30, "slow to be served again")
    assert d.get("/slow").json()["outstanding"] == 0
    assert d.post("/slow", json={"sleep": 0}).json() == {"slept": 0}


def test_deadline_is_504_and_full_queue_is_503(make_daemon: Any) -> None:
    d = make_daemon({"slow.py": SLOW, "slow.toml": "[serving]\ntimeout = 1\nqueue_limit = 1\n"})
    d.wait_settled()
    r = d.post("/slow", json={"sleep": 3})
    assert r.status_code == 504 and "[serving] timeout" in r.json()["error"]
    wait_until(lambda: d.post("/slow", json={"sleep": 0}).status_code == 200, 10, "slow to be free again")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: d.post("/slow", json={"sleep": 0.8}), range(6)))
    codes = sorted(a.status_code for a in answers)
    assert 503 in codes and (200 in codes or 504 in codes), codes
    full = next(a for a in answers if a.status_code == 503)
    assert full.headers["retry-after"] == "1" and "queue_limit" in full.json()["error"]


def test_gpu_api_on_cpu_only_machine_fails_clearly(make_daemon: Any) -> None:
    d = make_daemon({"g.py": OK, "g.toml": '[serving]\ndevice = "gpu"\n', "ok.py": OK})
    status = d.wait_settled()
    assert status["apis"]["g"]["state"] == "failed"
    assert "needs a GPU" in status["apis"]["g"]["error"]["message"]
    assert status["apis"]["ok"]["state"] == "ready"


def test_invalid_and_reserved_names_are_refused(make_daemon: Any) -> None:
    d = make_daemon({"Bad Name.py": OK, "healthz.py": OK, "ok.py": OK})
    status = d.wait_settled()
    assert "not a valid API name" in status["apis"]["Bad Name"]["error"]["message"]
    assert "reserved" in status["apis"]["healthz"]["error"]["message"]
    assert d.get("/healthz").json()["status"] == "ok"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "predictord", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_check_reports_each_problem(tmp_path: Path, name: str) -> None:
    source, message, line = BROKEN[name]
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    r = _cli("check", str(path))
    assert r.returncode == 1, r
    assert re.search(message, r.stderr), r.stderr
    assert r.stderr.startswith(f"{path}:{line}:" if line else f"{path}:"), r.stderr


def test_check_kills_a_hanging_init(tmp_path: Path) -> None:
    path = tmp_path / "hang.py"
    path.write_text(HANG)
    r = _cli("check", str(path), "--timeout", "3")
    assert r.returncode == 1 and "took longer than the load deadline (3s)" in r.stderr


HANGS_WITH_A_CHILD = '''
import subprocess
import sys
import threading


class PythonPredictor:
    def __init__(self, config):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        with open(__file__ + ".pid", "w") as f:
            f.write(str(child.pid))
        threading.Event().wait()  # never set: it waits for a server that never answers

    def predict(self, payload):
        return 1
'''


def test_check_ends_what_a_hanging_init_started(tmp_path: Path) -> None:
    path = tmp_path / "hang.py"
    path.write_text(HANGS_WITH_A_CHILD)
    r = _cli("check", str(path), "--timeout", "3")
    assert r.returncode == 1 and "took longer than the load deadline (3s)" in r.stderr, r
    child = int((tmp_path / "hang.py.pid").read_text())
    wait_until(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE, 10,
               "the process its __init__ started ended with the check")


BATCH_LIMITED = '''
class PythonPredictor:
    def __init__(self, config):
        self.most = config["most"]

    def predict(self, payload):
        if len(payload) > self.most:
            raise MemoryError(f"no room for a batch of {len(payload)}")
        return [len(payload) for _ in payload]
'''


@pytest.mark.parametrize("most", [2, 1])
def test_check_warms_batches_of_two_at_most(tmp_path: Path, most: int) -> None:
    """`predictord check` runs on the CPU: a batch of 2 checks the batching contract; larger ones are the load's."""
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "predictor.py").write_text(BATCH_LIMITED)
    (folder / "predictor.toml").write_text(f'[config]\nmost = {most}\n[serving]\nmax_batch_size = 64\n'
                                           'warmup = ["s.json"]\n')
    (folder / "s.json").write_text("{}")
    r = _cli("check", str(folder))
    if most == 2:
        assert r.returncode == 0 and "OK: API 'b'" in r.stdout, r
    else:
        assert r.returncode == 1 and "warm-up batch of 2 (the samples in turn): predict() raised MemoryError" \
            in r.stderr, r


def test_check_of_a_predictors_directory_checks_every_api_as_the_daemon_would_find_it(tmp_path: Path) -> None:
    # A release, checked before its link is swapped: each API, and what the daemon would refuse, named.
    good = "class PythonPredictor:\n    def __init__(self, config):\n        pass\n\n" \
           "    def predict(self, payload):\n        return 1\n"
    for rel in ("a.py", "b/predictor.py", "twin.py", "twin/predictor.py", "Upper.py"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(good)
    (tmp_path / "broken.py").write_text(BROKEN["syntax"][0])
    (tmp_path / "notes.txt").write_text("not an API")
    r = _cli("check", str(tmp_path))
    assert r.returncode == 1, r
    assert f"{tmp_path / 'a.py'}: OK: API 'a'" in r.stdout and f"{tmp_path / 'b'}: OK: API 'b'" in r.stdout
    assert re.search(rf"^{re.escape(str(tmp_path / 'broken.py'))}:\d+: .*{BROKEN['syntax'][1]}", r.stderr, re.M), r
    assert "two sources for API 'twin'" in r.stderr and "'Upper' is not a valid API name" in r.stderr
    assert r.stderr.rstrip().endswith(f"{tmp_path}: 5 APIs checked, 2 OK, 3 failed: Upper, broken, twin")
    for rel in ("broken.py", "twin.py", "Upper.py"):
        (tmp_path / rel).unlink()
    r = _cli("check", str(tmp_path))
    assert r.returncode == 0 and r.stdout.rstrip().endswith(f"{tmp_path}: 3 APIs checked, 3 OK"), r
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("check", str(empty))
    assert r.returncode == 1 and "no predictor in it" in r.stderr, r


@pytest.mark.parametrize("command", ["options", "check"])
def test_a_reader_that_leaves_early_gets_no_traceback(command: str, tmp_path: Path) -> None:
    # `predictord options | head -3`: the pipe closes before everything is written.
    (tmp_path / "a.py").write_text("class PythonPredictor:\n    def predict(self, payload):\n        return 1\n")
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "predictord", command, *([str(tmp_path)] * (command == "check"))],
                           stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def test_check_passes_a_good_predictor_and_prints_its_signature(tmp_path: Path) -> None:
    folder = tmp_path / "router"
    folder.mkdir()
    repo = Path(__file__).resolve().parents[2]
    for f in (repo / "predictors" / "router").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    r = _cli("check", str(folder))
    assert r.returncode == 0, r.stderr
    assert "OK: API 'router': __init__(config, predictor_dir), predict(query_params, payload)" in r.stdout


def test_bad_config_exits_naming_file_key_expected_and_found(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[server]\nport = "eighty"\n')
    r = _cli("--config", str(config))
    assert r.returncode == 2
    assert r.stderr.strip() == f"predictord: {config}: [server]: port: expected an integer, found 'eighty'"
    config.write_text("[server]\nhttp_wokers = 2\n")
    r = _cli("--config", str(config))
    assert r.returncode == 2 and "unknown key 'http_wokers'; allowed: host, port, http_workers" in r.stderr
