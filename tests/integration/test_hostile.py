"""Nothing in the predictors directory, and nothing a predictor does, can freeze, starve or exhaust the daemon (a
real daemon each, neighbours under light load). Speed is not asserted here: bench/hostile.py measures it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from broken import OK
from harness import HELD, HOSTILE_REASONS, Daemon, Load, cmdline, plant_hostile, wait_until

PID = '''
import os


class PythonPredictor:
    def __init__(self, config):
        self.generation = config.get("generation", 0)

    def predict(self, payload):
        return {"pid": os.getpid(), "generation": self.generation}
'''

GATED = HELD + '''
import threading


class PythonPredictor:
    def __init__(self, config):
        self.gate = config["gate"]

    def predict(self, payload):
        if payload.get("hang"):
            threading.Event().wait()  # never set: a predict() that never returns
        if payload.get("slow"):
            held(self.gate, until_exists=False)  # until the test removes the gate
        return {"done": True}
'''

CHILD = '''
import subprocess
import sys

# Sessions of their own: the harness's stop kills the daemon's process group, which must not end them for it.
AT_IMPORT = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)


class PythonPredictor:
    def __init__(self, config):
        self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)

    def predict(self, payload):
        return {"children": [AT_IMPORT.pid, self.child.pid], "generation": payload.get("g", 0)}
'''

FAILS_WITH_A_CHILD = '''
import subprocess
import sys


class PythonPredictor:
    def __init__(self, config):
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        raise RuntimeError("the model server it started is not enough")

    def predict(self, payload):
        return {}
'''

HOARDER = '''
import threading


class PythonPredictor:
    def __init__(self, config):
        self.block = bytearray(50 * 2**20)
        self.block[::4096] = b"x" * len(self.block[::4096])  # resident, not just reserved
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.hold, daemon=True)
        self.thread.start()  # a thread that keeps the instance (and its 50 MB) alive after unload

    def hold(self):
        self.stop.wait(3600)

    def predict(self, payload):
        return {"threads": threading.active_count()}
'''
CLOSES = HOARDER + '''
    def close(self):
        self.stop.set()
        self.thread.join()
'''

WRITER = '''
import os


class PythonPredictor:
    def __init__(self, config, predictor_dir):
        self.dir = predictor_dir

    def predict(self, payload):
        os.makedirs(os.path.join(self.dir, "cache"), exist_ok=True)
        with open(os.path.join(self.dir, "cache", "last.json"), "w") as f:
            f.write(str(payload))
        with open(os.path.join(self.dir, "predictions.log"), "a") as f:
            f.write("one more\\n")
        return {"written": True}
'''

PRINTER = '''
import sys


class PythonPredictor:
    def __init__(self, config):
        print("hello from __init__")

    def predict(self, payload):
        print("x" * 100_000)
        print("a line\\nwith a newline", file=sys.stderr)
        print('{"not": "json', flush=True)
        return {"printed": True}
'''


def children_of(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
    except psutil.NoSuchProcess:
        return set()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def test_hostile_files_are_refused_and_the_master_keeps_serving(make_daemon: Any) -> None:
    d = make_daemon({"ok.py": PID, "other.py": PID}, "[predictors]\ndebounce = 0.3\n[server]\ngraceful_timeout = 5\n")
    d.wait_settled()
    with Load(d, {"ok": 1}, seconds=120) as load:
        plant_hostile(d, OK)
        for name, reason in HOSTILE_REASONS.items():
            error = wait_until(lambda n=name: (r := d.get(f"/{n}")).status_code == 200 and r.json()["error"], 30,
                               f"{name} refused")
            assert error["kind"] == "unreadable" and reason in error["message"], error
            assert d.post(f"/{name}", json={}).status_code == 503
        d.wait_for_log(r"predictors/rootlink: a link to /, which holds no predictor\.py; not an API")
        assert "rootlink" in d.status()["daemon"]["not_apis"]
        d.write("other.toml", "[config]\ngeneration = 2\n")  # an edit of another API still loads
        wait_until(lambda: d.post("/other", json={}).json()["generation"] == 2, 30, "the edit of other to load")
        pid = d.post("/ok", json={}).json()["pid"]
        os.kill(pid, signal.SIGKILL)  # a killed worker is still replaced
        wait_until(lambda: (r := d.post("/ok", json={})).status_code == 200 and r.json()["pid"] != pid, 30,
                   "a replacement worker")
    assert len(load.failures("ok")) <= 1, "at most the one request inside the killed worker"
    assert d.stop() == 0, "SIGTERM still stops the daemon"


def test_an_exception_in_a_step_of_the_masters_loop_is_logged_and_the_loop_goes_on(make_daemon: Any) -> None:
    d = make_daemon({"ok.py": OK}, start=False)
    d.env["PREDICTORD_TEST_FAULTS"] = "directory,reconcile,publishing"
    d.start()
    for step in ("directory", "reconcile", "publishing"):
        d.wait_for_log(rf"the master's {step} step failed; the loop goes on")
    assert "a fault injected into the reconcile step" in d.logs()
    wait_until(lambda: d.post("/ok", json={}).status_code == 200, 30, "ok to be served all the same")
    assert "Unhandled exception in main loop" not in d.logs()


def test_a_stuck_master_turns_healthz_503(make_daemon: Any) -> None:
    d = make_daemon({"ok.py": OK})
    d.wait_settled()
    assert d.get("/healthz").status_code == 200
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        stuck = wait_until(lambda: (r := d.get("/healthz")).status_code == 503 and r.json(), 30, "healthz 503")
        assert stuck["status"] == "stuck" and "has not ticked" in stuck["error"]
        assert d.post("/ok", json={}).status_code == 200, "the HTTP workers still serve what they have"
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    wait_until(lambda: d.get("/healthz").status_code == 200, 30, "healthz 200 again")


def test_a_hung_reading_of_the_directory_holds_nothing_else(make_daemon: Any, tmp_path: Path) -> None:
    """A reading that hangs (a hung network mount, simulated by the reader's test gate): the master still replaces
    a killed worker, answers /healthz, serves the loaded versions, says once that the reading is stuck, and loads the
    change once the reading answers."""
    gate = tmp_path / "hung-mount"
    d = make_daemon({"a.py": PID, "b.py": PID}, "[predictors]\ndebounce = 0.2\n", start=False)
    d.env["PREDICTORD_TEST_READ_GATE"] = str(gate)
    d.start()
    status = d.wait_settled()
    old = status["apis"]["a"]["version"]["wanted"]
    gate.touch()
    d.write("a.toml", "[config]\ngeneration = 1\n")  # a change the hung reading cannot see yet
    worker = d.post("/b", json={}).json()["pid"]
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: (r := d.post("/b", json={})).status_code == 200 and r.json()["pid"] != worker, 30,
               "a replacement worker serving b")
    assert d.get("/healthz").status_code == 200
    d.wait_for_log(r"reading the predictors directory .* has taken \d+s \(a hung mount\?\)", 60)
    assert d.post("/a", json={}).json()["generation"] == 0 and d.get("/a").json()["version"]["wanted"] == old
    gate.unlink()
    wait_until(lambda: d.post("/a", json={}).json()["generation"] == 1, 30, "the change loaded once it answers")
    assert d.stop() == 0


def test_apis_beyond_max_apis_are_shown_and_load_once_room_frees(make_daemon: Any) -> None:
    files = {f"api{i:02d}.py": OK for i in range(12)}
    d = make_daemon(files, "[predictors]\nmax_apis = 10\ndebounce = 0.3\n")
    status = d.wait_settled(120)
    states = {n: a["state"] for n, a in status["apis"].items()}
    assert len(states) == 12 and list(states.values()).count("ready") == 10, states
    waiting = sorted(n for n, a in status["apis"].items() if a["state"] != "ready")
    assert waiting == ["api10", "api11"]
    for name in waiting:
        error = status["apis"][name]["error"]
        assert error["kind"] == "room" and "more than 10 APIs ([predictors] max_apis = 10)" in error["message"]
        r = d.post(f"/{name}", json={})
        assert r.status_code == 503 and "max_apis" in r.json()["error"]
    assert d.get("/readyz").json()["failed"] == {"api10": "failed", "api11": "failed"}
    assert "max_apis" in d.get("/readyz?api=api10").json()["error"]
    (d.predictors / "api00.py").unlink()
    (d.predictors / "api01.py").unlink()
    wait_until(lambda: all(d.post(f"/{n}", json={}).status_code == 200 for n in waiting), 60, "room to free up")


def test_probes_run_at_most_max_probes_at_once(make_daemon: Any) -> None:
    d = make_daemon({f"p{i}.py": "import torch\n" + OK for i in range(6)}, "[predictors]\nmax_probes = 2\n")
    status = d.wait_settled(120)
    assert all(a["state"] == "ready" for a in status["apis"].values())
    probes = status["daemon"]["probes"]
    assert probes["limit"] == 2 and probes["peak"] == 2 and probes["running"] == probes["waiting"] == 0
    d.wait_for_log(r"API p\d version \w+ passed its checks")


GATED_IMPORT = HELD + '''
held(GATE, until_exists=False)  # importing it takes until the test removes the gate
''' + OK


def test_versions_beyond_max_probes_show_waiting_to_be_checked(make_daemon: Any, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    d = make_daemon({f"w{i}.py": f"GATE = {str(gate)!r}\n" + GATED_IMPORT for i in range(3)},
                    "[predictors]\nmax_probes = 1\n")

    def checks() -> list[str]:
        return sorted(str(d.get(f"/w{i}").json()["check"]) for i in range(3))

    wait_until(lambda: checks()[0] == "being checked", 30, "one probe running")
    shown = checks()
    assert shown[0] == "being checked" and all(c.startswith("waiting to be checked") for c in shown[1:]), shown
    text = subprocess.run([sys.executable, "-m", "predictord", "status", "--config", str(d.config_path)],
                          capture_output=True, text=True, timeout=30).stdout
    assert text.count("waiting to be checked") == 2, text
    gate.unlink()
    status = d.wait_settled(60)
    assert all(status["apis"][f"w{i}"]["state"] == "ready" for i in range(3))
    assert status["daemon"]["probes"]["peak"] == 1


def test_a_slow_and_a_hung_predict_stall_no_neighbour(make_daemon: Any, tmp_path: Path) -> None:
    """The slow call and the hung call run off the worker's loop (it serves two APIs), so the neighbour answers
    while they run; the hung one has its worker replaced, make before break: the neighbour never fails."""
    gate = tmp_path / "gate"
    gate.touch()
    d = make_daemon({"gated.py": GATED, "gated.toml": f'[config]\ngate = "{gate}"\n[serving]\ntimeout = 2\n'
                     "threads = 2\n", "ok.py": PID},
                    "[workers]\nheartbeat_timeout = 60\n[server]\ngraceful_timeout = 5\n")  # the hung worker: 5 s
    d.wait_settled()
    with Load(d, {"ok": 2}, seconds=120) as load:
        wait_until(lambda: load.count("ok") > 50, 20, "load on ok")
        slow = threading.Thread(target=d.post, args=("/gated",), kwargs={"json": {"slow": True}}, daemon=True)
        slow.start()
        wait_until(lambda: d.get("/gated").json()["outstanding"] == 1, 10, "the slow predict running")
        since = time.monotonic()
        wait_until(lambda: load.served_since("ok", since, 50), 30, "ok to answer while gated's predict runs")
        assert d.get("/gated").json()["outstanding"] == 1, "all while the slow one was still running"
        gate.unlink()
        slow.join(30)
        before = d.post("/ok", json={}).json()["pid"]
        assert d.post("/gated", json={"hang": True}).status_code == 504
        d.wait_for_log(r"API gated predict\(\) has run \d+s .*; its APIs move to a new worker", 30)
        wait_until(lambda: d.post("/ok", json={}).json()["pid"] != before, 60, "ok moved to the new worker")
        d.wait_for_log(rf"pid {before} did not stop within \[server\] graceful_timeout|pid {before} was killed", 90)
        since = time.monotonic()
        wait_until(lambda: load.served_since("ok", since, 20), 30, "ok served after the replacement")
    assert load.failures("ok") == [], "the hung predict cost only its own API"
    assert d.post("/gated", json={}).json() == {"done": True}


def test_a_retiring_worker_that_never_drains_is_killed_after_graceful_timeout(make_daemon: Any,
                                                                            tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    d = make_daemon({"gated.py": GATED, "gated.toml": f'[config]\ngate = "{gate}"\n[serving]\ntimeout = 300\n'
                     'isolation = "process"\n', "ok.py": OK},
                    "[server]\ngraceful_timeout = 3\n[predictors]\ndebounce = 0.3\n")
    status = d.wait_settled()
    pid = status["apis"]["gated"]["replicas"][0]["pid"]
    held = threading.Thread(target=lambda: httpx.post(d.url("/gated"), json={"hang": True}, timeout=60), daemon=True)
    held.start()
    wait_until(lambda: d.get("/gated").json()["outstanding"] == 1, 10, "the predict that never returns")
    (d.predictors / "gated.py").unlink()  # its own worker retires, and would drain for ever
    d.wait_for_log(rf"retiring model worker \d+ \(cpu\) pid {pid}")
    d.wait_for_log(rf"pid {pid} did not stop within \[server\] graceful_timeout \(3s\); killing it", 60)
    wait_until(lambda: not alive(pid), 10, "the retired worker to be gone")
    assert d.post("/ok", json={}).status_code == 200


def test_processes_a_predictor_starts_end_with_its_version(make_daemon: Any) -> None:
    d = make_daemon({"child.py": CHILD}, "[predictors]\ndebounce = 0.3\n")
    d.wait_settled()
    assert d.proc is not None
    first = d.post("/child", json={}).json()["children"]
    assert all(alive(pid) for pid in first)
    # the probe's own child (started at import) was left behind by the probe: the master ends it
    wait_until(lambda: not strays(d), 30, "no process but the daemon's own under the master")
    d.write("child.py", CHILD + "\n# a new version\n")
    wait_until(lambda: d.post("/child", json={}).json()["children"] != first, 30, "the new version")
    wait_until(lambda: not any(alive(pid) for pid in first), 30, "the old version's processes gone")
    second = d.post("/child", json={}).json()["children"]
    (d.predictors / "child.py").unlink()
    wait_until(lambda: d.get("/child").status_code == 404, 30, "child deleted")
    wait_until(lambda: not any(alive(pid) for pid in second), 30, "the deleted version's processes gone")
    d.write("child.py", CHILD)
    third = wait_until(lambda: (r := d.post("/child", json={})).status_code == 200 and r.json()["children"], 30,
                       "child back")
    everything = children_of(d.proc.pid)
    assert d.stop() == 0
    left = [(pid, cmdline(psutil.Process(pid))) for pid in {*third, *everything} if alive(pid)]
    assert not left, f"nothing left after the daemon stops: {left}"


def test_processes_a_failed_load_started_end_with_it(make_daemon: Any) -> None:
    d = make_daemon({"ok.py": "class PythonPredictor:\n    def predict(self, payload):\n        return {}\n"},
                    "[workers]\ncpu = 1\n")
    worker = d.wait_settled()["workers"][0]["pid"]
    d.write("bad.py", FAILS_WITH_A_CHILD)
    wait_until(lambda: d.status()["apis"].get("bad", {}).get("state") == "failed", 60, "the load of bad to fail")
    wait_until(lambda: not children_of(worker), 30, "the process its __init__ started ended with the failed load")
    assert d.status()["workers"][0]["pid"] == worker and d.post("/ok", json={}).status_code == 200


HOLDS_AND_FAILS = '''
import threading


class PythonPredictor:
    def __init__(self, config):
        self.block = bytearray(300 * 2**20)
        self.block[::4096] = b"x" * len(self.block[::4096])  # resident
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.hold, daemon=True)
        self.thread.start()  # it keeps the instance, and its 300 MB, alive until close()

    def hold(self):
        self.stop.wait(3600)

    def predict(self, payload):
        raise ValueError("this sample is not one it can take")

    def close(self):
        self.stop.set()
        self.thread.join()
'''


@pytest.mark.parametrize("how", ["close", "recycle"])
def test_a_version_whose_warm_up_fails_lets_go_of_its_memory(make_daemon: Any, how: str) -> None:
    """A version that keeps a thread (and its 300 MB) and whose warm-up fails: its close() runs, as at an unload;
    without one, its worker is weighed as after an unload and replaced (make before break) past recycle_mib."""
    source, config = (HOLDS_AND_FAILS, "") if how == "close" else (
        HOLDS_AND_FAILS[:HOLDS_AND_FAILS.index("    def close")], "recycle_mib = 64\n")
    d = make_daemon({"ok.py": "class PythonPredictor:\n    def predict(self, payload):\n        return {}\n"},
                    "[workers]\ncpu = 1\n" + config)
    worker = d.wait_settled()["workers"][0]["pid"]
    before = rss(worker)
    d.write("bad/s.json", "{}")
    d.write("bad/predictor.toml", '[serving]\nwarmup = ["s.json"]\n')
    d.write("bad/predictor.py", source)
    wait_until(lambda: d.status()["apis"].get("bad", {}).get("state") == "failed", 60, "the load of bad to fail")
    if how == "close":
        wait_until(lambda: rss(worker) < before + 100 * 2**20, 20, "close() let its thread and its 300 MB go")
        assert d.status()["workers"][0]["pid"] == worker
    else:
        wait_until(lambda: not alive(worker), 60, "the worker that kept 300 MB replaced")
    assert d.post("/ok", json={}).status_code == 200


def strays(d: Daemon) -> set[int]:
    """The master's children that are neither its HTTP workers nor its model workers."""
    assert d.proc is not None
    master = psutil.Process(d.proc.pid)
    own = set(d.worker_pids().values()) | {c.pid for c in master.children() if cmdline(c) == master.cmdline()}
    return {c.pid for c in master.children() if c.pid not in own and alive(c.pid)}


@pytest.mark.parametrize("how", ["close", "recycle"])
def test_reloads_do_not_grow_a_worker_that_keeps_a_thread(make_daemon: Any, how: str) -> None:
    """A version that keeps a thread (and its 50 MB) past its unload: with close() it lets them go; without, the
    worker whose memory outgrows its APIs by [workers] recycle_mib is replaced. Either way, 10 reloads leave the
    worker serving it within 100 MB of where it started."""
    source, config = (CLOSES, "") if how == "close" else (HOARDER, "[workers]\nrecycle_mib = 64\n")
    d = make_daemon({"hoard.py": source}, "[predictors]\ndebounce = 0.2\n" + config)
    status = d.wait_settled()
    pid = status["apis"]["hoard"]["replicas"][0]["pid"]
    start = rss(pid)
    for generation in range(1, 11):
        old = d.get("/hoard").json()["version"]["serving"]
        d.write("hoard.toml", f"[config]\ngeneration = {generation}\n")
        wait_until(lambda o=old: (v := d.get("/hoard").json()["version"])["serving"] == [v["wanted"]] != o, 30,
                   f"reload {generation}")
    def serving() -> int:
        replicas = d.get("/hoard").json()["replicas"]
        return int(replicas[0]["pid"]) if replicas else 0

    wait_until(lambda: (w := serving()) and rss(w) < start + 100 * 2**20, 60, "worker memory within 100 MB of start")
    worker = serving()
    if how == "close":
        assert worker == pid, "close() let the memory go: no recycling needed"
    else:
        d.wait_for_log(r"replacing model worker \d+ \(cpu\): its memory is \d+ MiB over what it started with")


def test_a_linked_predictor_reloads_when_its_target_changes(make_daemon: Any, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere" / "linked"
    real.mkdir(parents=True)
    (real / "predictor.py").write_text(PID)
    single = tmp_path / "elsewhere" / "one.py"
    single.write_text(PID)
    d = make_daemon({}, "[predictors]\ndebounce = 0.3\n", start=False)
    (d.predictors / "linked").symlink_to(real)
    (d.predictors / "one.py").symlink_to(single)
    d.start().wait_settled()
    assert d.post("/linked", json={}).json()["generation"] == 0
    (real / "predictor.toml").write_text("[config]\ngeneration = 5\n")
    wait_until(lambda: d.post("/linked", json={}).json()["generation"] == 5, 30, "the linked folder to reload")
    single.write_text(PID.replace('config.get("generation", 0)', "7"))
    wait_until(lambda: d.post("/one", json={}).json()["generation"] == 7, 30, "the linked file to reload")


def test_writes_a_predictor_makes_into_its_folder_never_reload_it(make_daemon: Any) -> None:
    d = make_daemon({"writer/predictor.py": WRITER}, "[predictors]\ndebounce = 0.2\n")
    d.wait_settled()
    version = d.get("/writer").json()["version"]["serving"]
    for i in range(20):
        assert d.post("/writer", json={"i": i}).json() == {"written": True}
    d.write("writer/predictor.toml", "[config]\n")  # a real edit, after which the writes must have settled
    wait_until(lambda: d.get("/writer").json()["version"]["serving"] != version, 30, "the edit to load")
    assert d.logs().count("API writer changed") == 1, "only the edit made a new version"


def test_names_with_control_characters_are_escaped_in_the_log_and_status(make_daemon: Any) -> None:
    d = make_daemon({"ok.py": OK, "bad\nname\x1b[2J.py": OK})
    d.wait_settled()
    logs = d.logs()
    assert "\x1b" not in logs and "bad\\nname\\x1b[2J" in logs
    assert not any(line.startswith("name") for line in logs.splitlines()), "no forged log line"
    shown = subprocess.run([sys.executable, "-m", "predictord", "status", "--config", str(d.config_path)],
                           capture_output=True, text=True, timeout=60)
    assert "\x1b" not in shown.stdout and "bad\\nname\\x1b[2J" in shown.stdout, shown.stdout


def test_what_a_predictor_prints_is_logged_per_api_bounded_and_json_safe(make_daemon: Any) -> None:
    d = make_daemon({"printer.py": PRINTER}, '[server]\nlog_format = "json"\n')
    d.wait_settled()
    assert d.post("/printer", json={}).json() == {"printed": True}
    d.wait_for_log(r"a line")
    d.wait_for_log(r"with a newline")
    events = [json.loads(line) for line in d.logs().splitlines() if line.startswith("{")]
    assert len(events) == sum(1 for line in d.logs().splitlines() if line.strip()), "every line is JSON"
    printed = [e for e in events if e["logger"] == "predictord.output"]
    assert {"API printer (stdout): hello from __init__", 'API printer (stdout): {"not": "json'} <= \
        {e["message"] for e in printed}
    long = next(e for e in printed if "xxxx" in e["message"])
    assert len(long["message"]) < 9000 and "(91808 more characters)" in long["message"]
    assert all(e.get("api") == "printer" for e in printed)
    assert re.search(r"API printer \(stderr\): a line", d.logs())
