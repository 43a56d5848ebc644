"""Hot reload with the file operations users really do, under load: nothing fails, versions only move forward."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from broken import SLOW
from harness import Daemon, Load, wait_until

FAST = "[predictors]\ndebounce = 0.3\n"


def gen(n: int, sleep: float = 0.0) -> str:
    """A predictor that says which generation of its file answered."""
    return f'''
import time


class PythonPredictor:
    def __init__(self, config):
        self.generation = {n}

    def predict(self, payload):
        time.sleep({sleep})
        return {{"generation": self.generation}}
'''


def atomic_save(path: Path, text: str) -> None:
    """What most editors do: write a temp file beside it, then rename it over the original."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def vim_save(path: Path, text: str) -> None:
    """vim's default: rename the original to a backup, write the file anew, delete the backup."""
    backup = path.with_name(path.name + "~")
    os.rename(path, backup)
    path.write_text(text)
    os.remove(backup)


def serving(d: Daemon, name: str) -> dict[str, Any] | None:
    r = d.get(f"/{name}")
    return r.json() if r.status_code == 200 else None


def wait_new_version(d: Daemon, name: str, old: str, timeout: float = 30) -> str:
    """Wait until the API serves exactly one version, other than ``old``; return it."""
    def check() -> str | None:
        s = serving(d, name)
        if s and s["state"] == "ready" and len(s["version"]["serving"]) == 1 and s["version"]["serving"][0] != old:
            return str(s["version"]["serving"][0])
        return None

    return wait_until(check, timeout, f"a new version of {name}")  # type: ignore[no-any-return]


def test_new_api_is_served_when_dropped_in(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"a.py": gen(1)}, FAST)
    d.wait_settled()
    assert d.post("/new", json={}).status_code == 404
    atomic_save(d.predictors / "new.py", gen(7))
    wait_until(lambda: d.post("/new", json={}).status_code == 200, 30, "new to be served")
    assert d.post("/new", json={}).json() == {"generation": 7}
    d.wait_for_log(r"API new found \(version \w+\); checking it")


@pytest.mark.parametrize("save", [atomic_save, vim_save], ids=["atomic-rename", "vim"])
def test_edit_takes_over(make_daemon: Callable[..., Daemon], save: Callable[[Path, str], None]) -> None:
    d = make_daemon({"a.py": gen(1)}, FAST)
    d.wait_settled()
    old = d.get("/a").json()["version"]["serving"][0]
    save(d.predictors / "a.py", gen(2))
    new = wait_new_version(d, "a", old)
    r = d.post("/a", json={})
    assert r.json() == {"generation": 2} and r.headers["x-predictor-version"] == new
    assert "is broken" not in d.logs()
    assert d.logs().count("API a changed") == 1, "one save, one reload (vim's delete did not unload it)"
    assert "API a was removed" not in d.logs()


def test_in_place_write_in_two_chunks_never_loads_half(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"a.py": gen(1)}, FAST)
    d.wait_settled()
    old = d.get("/a").json()["version"]["serving"][0]
    text = gen(2)
    with open(d.predictors / "a.py", "w") as f:
        f.write(text[: len(text) // 2])  # half a class: a syntax error if it were loaded
        f.flush()
        time.sleep(0.2)  # a slow writer: longer than half the quiet period, shorter than all of it
        f.write(text[len(text) // 2:])
    wait_new_version(d, "a", old)
    assert d.post("/a", json={}).json() == {"generation": 2}
    assert "is broken" not in d.logs() and "syntax error" not in d.logs()


FOLDER = '''
from pathlib import Path


class PythonPredictor:
    def __init__(self, config, predictor_dir):
        size = (Path(predictor_dir) / "weights.bin").stat().st_size
        if size != config["size"]:
            raise RuntimeError(f"weights.bin is {size} bytes, expected {config['size']}: loaded half-copied")
        self.size = size

    def predict(self, payload):
        return {"size": self.size}
'''


def stage_folder(root: Path, name: str, size: int) -> Path:
    folder = root / "staging" / name
    folder.mkdir(parents=True)
    (folder / "predictor.py").write_text(FOLDER)
    (folder / "predictor.toml").write_text(f"[config]\nsize = {size}\n")
    with open(folder / "weights.bin", "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
    return folder


def test_mv_of_a_folder(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = make_daemon({"a.py": gen(1)}, FAST)
    d.wait_settled()
    folder = stage_folder(tmp_path, "moved", 1 << 20)
    os.rename(folder, d.predictors / "moved")
    wait_until(lambda: d.post("/moved", json={}).status_code == 200, 30, "moved to be served")
    assert d.post("/moved", json={}).json() == {"size": 1 << 20}


def test_cp_r_of_a_folder_with_large_weights_loads_only_when_complete(make_daemon: Callable[..., Daemon],
                                                                      tmp_path: Path) -> None:
    d = make_daemon({"a.py": gen(1)}, FAST)
    d.wait_settled()
    size = 128 << 20
    folder = stage_folder(tmp_path, "big", size)
    subprocess.run(["cp", "-r", str(folder), str(d.predictors / "big")], check=True, timeout=120)
    wait_until(lambda: d.post("/big", json={}).status_code == 200, 60, "big to be served")
    assert d.post("/big", json={}).json() == {"size": size}
    assert "loaded half-copied" not in d.logs()
    assert len(d.get("/big").json()["version"]["serving"]) == 1


def test_rm_unloads_after_in_flight_requests_finish(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"slow.py": SLOW, "a.py": gen(1)}, FAST)
    d.wait_settled()
    result: list[httpx.Response] = []
    t = threading.Thread(target=lambda: result.append(d.post("/slow", json={"sleep": 2})))
    t.start()
    wait_until(lambda: d.get("/slow").json()["outstanding"] == 1, 10, "a request in flight")
    os.remove(d.predictors / "slow.py")
    wait_until(lambda: d.post("/slow", json={}).status_code == 404, 30, "slow to be gone")
    t.join(30)
    assert result[0].status_code == 200 and result[0].json() == {"slept": 2}
    d.wait_for_log(r"unloading API slow from model worker")
    assert d.post("/a", json={}).status_code == 200


def test_rm_r_of_a_folder(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = make_daemon({"a.py": gen(1)}, FAST)
    folder = stage_folder(tmp_path, "gone", 1 << 20)
    shutil.copytree(folder, d.predictors / "gone")
    wait_until(lambda: d.post("/gone", json={}).status_code == 200, 30, "gone to be served")
    shutil.rmtree(d.predictors / "gone")
    wait_until(lambda: d.post("/gone", json={}).status_code == 404, 30, "gone to be removed")
    assert "gone" not in d.status()["apis"]


def release(root: Path, name: str, files: dict[str, str]) -> Path:
    folder = root / "releases" / name
    folder.mkdir(parents=True)
    for rel, text in files.items():
        (folder / rel).write_text(text)
    return folder


def point(link: Path, target: str) -> None:
    """Deploy as a release tool does: a new link beside the old one, renamed over it (atomic)."""
    tmp = link.with_name(link.name + ".new")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def test_a_release_deployed_by_swapping_a_link_is_served(make_daemon: Callable[..., Daemon]) -> None:
    # [predictors] dir is a link to the release being served (Capistrano's and Ansible's layout). The daemon follows
    # it when it is swapped: the new release's APIs take over, make before break; one it lacks goes away; while the
    # link points nowhere, everything keeps serving.
    d = make_daemon({}, FAST + '[predictors]\ndir = "current"\n', start=False)
    release(d.root, "r1", {"a.py": gen(1), "b.py": gen(100), "gone.py": gen(7)})
    release(d.root, "r2", {"a.py": gen(2), "b.py": gen(100), "new.py": gen(5)})
    point(d.root / "current", "releases/r1")
    d.start()
    d.wait_settled()
    old = d.get("/a").json()["version"]["serving"][0]
    with Load(d, {"a": 2, "b": 1}) as load:
        point(d.root / "current", "releases/r2")
        wait_until(lambda: d.post("/new", json={}).status_code == 200, 30, "new, from release r2")
        wait_new_version(d, "a", old)
        wait_until(lambda: d.post("/gone", json={}).status_code == 404, 30, "gone, not in r2, to go away")
        status = d.status()
        assert status["daemon"]["predictors_dir"] == str((d.root / "releases/r2").resolve())
        assert [e["text"] for e in status["events"] if e["kind"] == "directory"] == [
            f"the predictors directory is now {d.root / 'releases/r2'}"]
        point(d.root / "current", "releases/r3")  # not there yet
        d.wait_for_log(r"the predictors directory \S+/current is not there")
        shutil.copytree(d.root / "releases/r2", d.root / "releases/r3.tmp")
        atomic_save(d.root / "releases/r3.tmp/a.py", gen(3))
        os.rename(d.root / "releases/r3.tmp", d.root / "releases/r3")
        wait_until(lambda: d.post("/a", json={}).json() == {"generation": 3}, 30, "a from release r3")
    assert load.failures("a") == [] and load.failures("b") == []
    assert {o.body["generation"] for o in load.of("b")} == {100}
    for client in load.clients("a"):
        seen = [o.body["generation"] for o in client]
        assert seen == sorted(seen) and seen[0] == 1, "a client saw a release go back"
    assert set(d.status()["apis"]) == {"a", "b", "new"}


def test_a_directory_made_or_replaced_after_the_start_is_served(make_daemon: Callable[..., Daemon],
                                                                tmp_path: Path) -> None:
    d = make_daemon({}, FAST, start=False)
    d.predictors.rmdir()  # not there yet: the daemon starts with no API
    d.start()
    d.wait_settled()
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "a.py").write_text(gen(1))
    os.rename(staged, d.predictors)
    wait_until(lambda: d.post("/a", json={}).status_code == 200, 30, "a, in the directory made after the start")
    # Replaced whole: the old folder moved away, a new one moved in (what `rsync` to a new folder and a swap do).
    staged.mkdir()
    (staged / "b.py").write_text(gen(100))
    os.rename(d.predictors, tmp_path / "old")
    os.rename(staged, d.predictors)
    wait_until(lambda: d.post("/b", json={}).status_code == 200, 30, "b, in the new directory")
    wait_until(lambda: d.post("/a", json={}).status_code == 404, 30, "a, not in it, to go away")
    (d.predictors / "c.py").write_text(gen(200))  # and the new directory is watched
    wait_until(lambda: d.post("/c", json={}).status_code == 200, 30, "c, dropped into the new directory")


MEMORY = '''
import numpy as np


class PythonPredictor:
    def __init__(self, config):
        self.weights = np.ones(300 * 2**20 // 8)  # 300 MiB

    def predict(self, payload):
        return {"sum": float(self.weights[:4].sum())}
'''


def test_deleted_api_returns_its_memory(make_daemon: Callable[..., Daemon]) -> None:
    psutil = pytest.importorskip("psutil")
    d = make_daemon({"mem.py": MEMORY, "mem.toml": '[serving]\ndevice = "cpu"\n', "a.py": gen(1)}, FAST)
    status = d.wait_settled()
    pid = status["apis"]["mem"]["replicas"][0]["pid"]
    assert d.post("/mem", json={}).json() == {"sum": 4.0}
    loaded = psutil.Process(pid).memory_info().rss
    os.remove(d.predictors / "mem.py")
    wait_until(lambda: psutil.Process(pid).memory_info().rss < loaded - 250 * 2**20, 30,
               "the worker's RSS to drop by the 300 MiB the API held")


def test_broken_change_keeps_old_version_then_fix_loads(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"a.py": gen(1), "b.py": gen(100)}, FAST)
    d.wait_settled()
    old = d.get("/a").json()["version"]["serving"][0]
    with Load(d, {"a": 3, "b": 1}) as load:
        atomic_save(d.predictors / "a.py", "class PythonPredictor:\n    def predict(self, payload)\n")
        d.wait_for_log(r"API a version \w+ is broken: .*a\.py:2: syntax error")
        s = wait_until(lambda: (r := d.get("/a").json())["error"] and r, 10, "the error in GET /a (next routes)")
        assert s["state"] == "ready" and s["version"]["serving"] == [old] and s["version"]["wanted"] != old
        assert s["error"]["line"] == 2 and s["error"]["file"].endswith("a.py")
        atomic_save(d.predictors / "a.py", gen(2))
        new = wait_new_version(d, "a", old)
    assert load.failures("a") == [] and load.failures("b") == []
    assert d.logs().count("is broken") == 1
    assert d.get("/a").json()["error"] is None
    for client in load.clients("a"):
        versions = [o.version for o in client]
        assert set(versions) <= {old, new}
        assert versions == sorted(versions, key=lambda v: v == new), "old until the fix, then new"


def test_twenty_reloads_under_load_fail_nothing(make_daemon: Callable[..., Daemon]) -> None:
    # One replica of a, so that each client's versions only go forward: the rebalancer, which could add a second
    # under this load, is off (a roll over several replicas serves both versions until it ends: README, "Edit").
    d = make_daemon({"a.py": gen(0, 0.002), "b.py": gen(100, 0.002)},
                    FAST + "[workers]\ncpu = 2\n[rebalance]\nenabled = false\n")
    d.wait_settled()
    versions = [d.get("/a").json()["version"]["serving"][0]]
    with Load(d, {"a": 4, "b": 2}) as load:
        for n in range(1, 21):
            atomic_save(d.predictors / "a.py", gen(n, 0.002))
            versions.append(wait_new_version(d, "a", versions[-1]))
        wait_until(lambda: all(c[-1].version == versions[-1] for c in load.clients("a")), 10,
                   "every client to see the last version")
    assert load.failures("a") == [] and load.failures("b") == []
    assert load.count("a") > 100 and load.count("b") > 50
    order = {v: i for i, v in enumerate(versions)}
    for client in load.clients("a"):
        seen = [order[o.version] for o in client]
        assert seen == sorted(seen), "a client saw a version go back"
        assert all(o.body == {"generation": order[o.version]} for o in client), "header and body disagree"
    assert {o.body["generation"] for o in load.of("b")} == {100}


def test_sighup_rolls_new_workers_and_keeps_serving(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"a.py": gen(1), "a.toml": "[serving]\nreplicas = 2\n"}, FAST)
    d.wait_settled()
    assert len(d.status()["workers"]) == 1
    with Load(d, {"a": 3}) as load:
        text = d.config_path.read_text()
        d.config_path.write_text(text.replace("cpu = 1", "cpu = 2"))
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_until(lambda: len(d.get("/a").json()["replicas"]) == 2, 30, "a second replica on the new worker")
        d.config_path.write_text(text)  # and back to one worker: the extra one drains and goes
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_for_log(r"retiring model worker \d \(cpu\) pid \d+: its slot is no longer configured")
        wait_until(lambda: len(d.status()["workers"]) == 1, 30, "the retired worker to exit")
        d.config_path.write_text("[server]\nport = 'broken'\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_for_log(r"SIGHUP: .*port: expected an integer.*keeping the running configuration")
    assert load.failures("a") == []
    assert d.get("/healthz").status_code == 200


def test_sighup_applies_new_server_settings_and_tokens_with_new_http_workers(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"a.py": gen(1)}, FAST + "[server]\nmax_body_bytes = 100000\n")
    d.wait_settled()
    assert d.proc is not None
    http = set(map(int, re.findall(r"\[(\d+) http\d+\] uvicorn.error: Started server process", d.logs())))
    assert len(http) == 2
    text = d.config_path.read_text()
    with Load(d, {"a": 3}) as load:
        d.config_path.write_text(text.replace("max_body_bytes = 100000", "max_body_bytes = 1000\naccess_log = true"))
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_until(lambda: d.post("/a", content=b"x" * 2000).status_code == 413, 20, "the new body limit")
        wait_until(lambda: not any(psutil.pid_exists(p) for p in http), 20, "the old HTTP workers to exit")
        d.wait_for_log(r"\[\d+ http\d+\] predictord.access: POST /a 200")
    assert load.failures("a") == [] and load.count("a") > 20
    assert "SIGHUP: the [server] settings changed: starting 2 new HTTP workers, then stopping the old ones" in d.logs()

    # a token: set, then rotated in its file with the config unchanged (`systemctl reload` after writing it)
    token = d.root / "token"
    token.write_text("first")
    token.chmod(0o600)
    d.config_path.write_text(d.config_path.read_text().replace("[server]\n", f'[server]\nauth_token_file = '
                                                                            f'"{token}"\n'))
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_until(lambda: d.post("/a", json={}).status_code == 401, 20, "the token required")
    assert d.post("/a", json={}, headers={"Authorization": "Bearer first"}).status_code == 200
    token.write_text("second")
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_until(lambda: d.post("/a", json={}, headers={"Authorization": "Bearer second"}).status_code == 200, 20,
               "the rotated token")
    assert d.post("/a", json={}, headers={"Authorization": "Bearer first"}).status_code == 401
    rolls = d.logs().count("settings changed: starting")
    before = len(d.logs())
    os.kill(d.proc.pid, signal.SIGHUP)  # nothing changed: the HTTP workers stay
    d.wait_for_log(r"SIGHUP: the \[server\] settings are unchanged: the HTTP workers keep running", after=before)
    assert d.logs().count("settings changed: starting") == rolls == 3


CHATTY = '''
import logging

log = logging.getLogger(__name__)


class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        log.debug("a debug line of request %s", payload["n"])
        return "ok"
'''


def test_sighup_applies_the_log_level_and_probes_and_says_what_takes_a_restart(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"chatty.py": CHATTY}, FAST + "[predictors]\nmax_probes = 2\n")
    pid = d.wait_settled()["workers"][0]["pid"]
    assert d.post("/chatty", json={"n": 1}).status_code == 200
    assert d.proc is not None and d.status()["daemon"]["probes"]["limit"] == 2
    text = d.config_path.read_text().replace('log_level = "info"', 'log_level = "debug"')
    text = text.replace("max_probes = 2", "max_probes = 1").replace("cpu = 1", "cpu = 1\ntorch_threads = 1")
    d.config_path.write_text(text)
    os.kill(d.proc.pid, signal.SIGHUP)
    d.wait_for_log(r"SIGHUP: \[workers\] torch_threads takes a restart; the running value stays")
    wait_until(lambda: d.status()["daemon"]["probes"]["limit"] == 1, 10, "max_probes applied")

    def logged() -> bool:
        d.post("/chatty", json={"n": 2})
        return "a debug line of request 2" in d.logs()

    wait_until(logged, 20, "the model worker's debug line")
    assert "a debug line of request 1" not in d.logs()
    assert d.status()["workers"][0]["pid"] == pid, "the same model worker, not a new one"


def test_a_replacement_worker_loads_the_last_good_version_while_the_file_is_broken(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon({"a.py": gen(1)}, FAST)
    d.wait_settled()
    old = d.get("/a").json()["version"]["serving"][0]
    atomic_save(d.predictors / "a.py", "class PythonPredictor:\n    def predict(self, payload)\n")
    d.wait_for_log(r"API a version \w+ is broken: .*a\.py:2: syntax error")
    s = wait_until(lambda: (r := d.get("/a").json())["error"] and r, 10, "the error in GET /a (next routes)")
    assert s["error"]["file"] == str(d.predictors / "a.py"), "errors name the user's file, not the snapshot"
    pid = s["replicas"][0]["pid"]
    os.kill(pid, signal.SIGKILL)  # the worker holding the old version dies while the file on disk is broken
    d.wait_for_log(r"loading API a version \w+ on model worker \d \(cpu\), the last good version")

    def served_again() -> bool:
        s = d.get("/a").json()
        return bool(s["replicas"]) and s["replicas"][0]["pid"] != pid
    wait_until(served_again, 30, "a replacement worker serving the old version")
    r = d.post("/a", json={})
    assert r.json() == {"generation": 1} and r.headers["x-predictor-version"] == old
    atomic_save(d.predictors / "a.py", gen(2))  # and the fix still takes over
    wait_new_version(d, "a", old)
    assert d.post("/a", json={}).json() == {"generation": 2}
