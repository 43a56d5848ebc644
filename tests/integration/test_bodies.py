"""Large bodies through the real daemon: raw bytes and JSON of megabytes arrive exact (through /dev/shm), a
malformed large JSON body is a 400, integers past 64 bits stay exact, nothing is left in /dev/shm, a replaced HTTP
worker's files of the same names are read afresh; and the preload stays shared (its objects are frozen out of the
workers' garbage collection)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
from faults import http_worker_pids
from harness import wait_until

from predictord import bodies

TORCH_PRELOADED = True  # the model path, as production runs it (harness.TORCH)

SIZE = '''
import gc
import hashlib


class PythonPredictor:
    def predict(self, payload):
        if isinstance(payload, bytes):
            return {"length": len(payload), "sha": hashlib.sha256(payload).hexdigest()}
        if "text" in payload:
            return {"length": len(payload["text"]), "sha": hashlib.sha256(payload["text"].encode()).hexdigest()}
        if "frozen" in payload:
            return {"frozen": gc.get_freeze_count()}
        return {"big": str(payload["big"]), "count": len(payload["x"])}
'''


def shm_files(master: int) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"predictord-{master}-*"))


def test_large_bodies_arrive_exact_and_leave_nothing_behind(make_daemon: Any) -> None:
    d = make_daemon({"size.py": SIZE})
    d.wait_settled()
    assert d.proc is not None
    raw = bytes(range(256)) * (3 * 2**20 // 256)
    r = d.post("/size", content=raw, headers={"Content-Type": "application/octet-stream"})
    assert r.json() == {"length": len(raw), "sha": hashlib.sha256(raw).hexdigest()}
    text = "é" * 2_000_000
    r = d.post("/size", content=json.dumps({"text": text}, ensure_ascii=False).encode(),
               headers={"Content-Type": "application/json"})
    assert r.json() == {"length": len(text), "sha": hashlib.sha256(text.encode()).hexdigest()}

    def chunks() -> Iterator[bytes]:
        for _ in range(24):
            yield b"\x01" * 65536

    r = d.post("/size", content=chunks(), headers={"Content-Type": "application/octet-stream"})  # chunked, no length
    assert r.json()["length"] == 24 * 65536
    numbers = {"big": 123456789012345678901234567890, "x": [0.5] * 100_000}
    assert d.post("/size", json=numbers).json() == {"big": "123456789012345678901234567890", "count": 100_000}
    broken = b'{"text": "' + b"x" * 2_000_000
    r = d.post("/size", content=broken, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON: Unterminated string")
    # Past PARSE_IN_THREAD (4 MiB), parsed in a thread, one at a time per HTTP worker: three at once, each exact.
    huge = ["é" * 2_200_000, "ü" * 2_300_000, "x" * 4_500_000]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda t: d.post("/size", content=json.dumps({"text": t}, ensure_ascii=False).encode(),
                                                 headers={"Content-Type": "application/json"}), huge))
    assert [a.json() for a in answers] == [{"length": len(t), "sha": hashlib.sha256(t.encode()).hexdigest()}
                                           for t in huge]
    r = d.post("/size", content=b'{"text": "' + b"x" * 4_500_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON: Unterminated string")
    assert d.post("/size", content=json.dumps({"text": huge[2]}), headers={"Content-Type": "application/json"}).json() \
        == {"length": len(huge[2]), "sha": hashlib.sha256(huge[2].encode()).hexdigest()}  # the 400 freed its turn
    master = d.proc.pid
    assert len(shm_files(master)) <= 8, "only the HTTP workers' few reusable files"
    assert d.stop() == 0
    wait_until(lambda: not shm_files(master), 10, "no shared body left after the daemon stops")


def test_the_preload_is_frozen_out_of_the_workers_garbage_collection(make_daemon: Any) -> None:
    d = make_daemon({"size.py": SIZE})
    d.wait_settled()
    frozen = d.post("/size", json={"frozen": True}).json()["frozen"]
    assert frozen > 50_000, f"torch's objects are frozen ({frozen}): no collection walks them or unshares their pages"


def test_the_files_of_a_replaced_http_worker_are_read_afresh(make_daemon: Any) -> None:
    # A replacement HTTP worker names its files as the one it replaces did, while the model worker keeps a mapping of
    # each file it read (bodies.Reader): every body must still arrive as sent, never the dead worker's last one.
    d = make_daemon({"size.py": SIZE})
    d.wait_settled()
    assert d.proc is not None
    master, models = d.proc.pid, set(d.worker_pids().values())

    def post_all(fill: bytes) -> set[str]:
        body = fill * 200_000  # past SHARED_FROM: through a shared file
        expected = {"length": len(body), "sha": hashlib.sha256(body).hexdigest()}
        with ThreadPoolExecutor(4) as pool:  # new connections, so both HTTP workers take some
            answers = list(pool.map(lambda _: httpx.post(d.url("/size"), content=body, timeout=30), range(8)))
        assert [a.json() for a in answers] == [expected] * 8
        return {p.name for p in shm_files(master)}

    before = post_all(b"a")
    victims = http_worker_pids(d, models)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(pids := http_worker_pids(d, models)) == 2 and not set(pids) & set(victims), 30,
               "gunicorn to replace both HTTP workers")
    d.client.close()
    d.client = httpx.Client(timeout=30)
    after = post_all(b"b")
    assert before & after, f"the replacements reused none of the names ({before} then {after}): nothing was tested"


BLOB = '''
import random


class PythonPredictor:
    def predict(self, query_params):
        return random.Random(int(query_params["seed"])).randbytes(int(query_params["n"]))
'''


def test_large_answers_go_through_the_model_workers_files_which_it_reuses_and_the_master_removes(
        make_daemon: Any) -> None:
    d = make_daemon({"blob.py": BLOB})
    d.wait_settled()
    assert d.proc is not None
    master, (model,) = d.proc.pid, d.worker_pids().values()
    sizes = [65_536, 70_000, 200_000, 1_000_000, 3_000_000]

    def fetch(seed: int) -> bool:
        n = sizes[seed % len(sizes)]
        r = httpx.post(d.url(f"/blob?n={n}&seed={seed}"), timeout=30)
        return r.status_code == 200 and r.content == random.Random(seed).randbytes(n)

    def its_files(pid: int) -> list[Path]:
        return [p for p in shm_files(master) if p.name.startswith(f"predictord-{master}-m{pid}-")]

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(fetch, range(40)))
    # Through the worker's files, each reused once given back: about one per client (a RELEASE and the next job may
    # arrive in either order from two HTTP workers), far fewer than the 40 answers.
    assert 1 <= len(its_files(model)) <= 12, its_files(model)
    os.kill(model, signal.SIGKILL)
    wait_until(lambda: not its_files(model), 30, "the master to remove a dead model worker's answer files")
    wait_until(lambda: d.status()["apis"]["blob"]["state"] == "ready" and model not in d.worker_pids().values(), 60,
               "the worker's replacement to serve")
    assert fetch(3)


def test_what_a_killed_daemon_left_in_dev_shm_is_removed_by_the_next_one(make_daemon: Any) -> None:
    # A master killed outright (SIGKILL, the OOM killer) cleans nothing up; the next daemon removes its files (those
    # of no live daemon: a lock that its processes hold says which are live), and leaves a live one's alone.
    killed, alive = make_daemon({"blob.py": BLOB}), make_daemon({"blob.py": BLOB})
    for d in (killed, alive):
        d.wait_settled()
        assert d.post("/blob?n=200000&seed=1", content=b"\0" * 300_000).status_code == 200
        assert d.proc is not None and shm_files(d.proc.pid)  # a body's file and an answer's
    assert killed.proc is not None and alive.proc is not None
    os.killpg(killed.proc.pid, signal.SIGKILL)
    killed.proc.wait(10)
    left = shm_files(killed.proc.pid)
    assert left, "nothing cleaned up after a SIGKILL"
    lock = Path(f"/dev/shm/predictord-{killed.proc.pid}.lock")
    assert lock.exists()
    d = make_daemon({"blob.py": BLOB})
    # every live daemon sweeps (at its start, then every 5 s): the new one, or the one alive, whichever comes first
    said = rf"removed {len(left)} files a killed predictord \(master pid {killed.proc.pid}\) left in /dev/shm"
    wait_until(lambda: re.search(said, d.logs() + alive.logs()), 30, "the killed daemon's files swept, and said")
    assert not shm_files(killed.proc.pid) and not lock.exists()
    assert shm_files(alive.proc.pid), "a live daemon's files stay"
    assert alive.post("/blob?n=200000&seed=2", content=b"\0" * 300_000).content == random.Random(2).randbytes(200_000)
    assert alive.stop() == 0
    assert not Path(f"/dev/shm/predictord-{alive.proc.pid}.lock").exists(), "a clean stop removes its lock too"


HELD = '''
import random


class PythonPredictor:
    def __init__(self, config):
        self.blob = bytes(range(250)) * 160_000  # 40 MB made once, with no transient: its start-up memory

    def predict(self, payload):
        return self.blob
'''


def test_a_model_workers_answer_files_do_not_count_against_max_rss_mib(make_daemon: Any) -> None:
    probe = make_daemon({"held.py": HELD})
    probe.wait_settled()
    (pid,) = probe.worker_pids().values()
    limit = (psutil.Process(pid).memory_info().rss >> 20) + 30  # less than one 40 MB answer's file
    probe.stop()
    d = make_daemon({"held.py": HELD}, f"[workers]\nmax_rss_mib = {limit}\n")
    d.wait_settled()
    assert d.proc is not None
    (model,) = d.worker_pids().values()
    blob = bytes(range(250)) * 160_000

    def fetch(_: int) -> bool:
        r = httpx.post(d.url("/held"), json={}, timeout=60)
        return r.status_code == 200 and r.content == blob

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(fetch, range(16)))
    held = bodies.answers_held(d.proc.pid, model)
    assert held >= 40_000_000, f"its answer files ({held} bytes) alone are past the limit's headroom"
    assert psutil.Process(model).memory_info().rss >> 20 > limit, "its RSS counts them: the test tests something"
    assert list(d.worker_pids().values()) == [model] and "max_rss_mib" not in d.logs(), "not killed for them"
