"""Several predictord hosts behind a real HAProxy (Debian's haproxy; `make balancer-deps`): two daemons on two
loopback ports, each with its own predictors directory and admin socket, and HAProxy in front with the recipe's
configuration (deploy/haproxy_config.py). Load goes through HAProxy while hosts restart, roll a new version, get a
broken one, or serve an API that failed on one of them; nothing fails."""

from __future__ import annotations

import importlib.util
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, Load, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
WHO = '''
import os


class PythonPredictor:
    def __init__(self, config):
        self.release = config.get("release", 1)

    def predict(self, payload):
        return {"host": os.environ["HOST_NAME"], "release": self.release}
'''
BROKEN = "class PythonPredictor:\n    def predict(self, payload)\n        return 1\n"

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="needs Debian's haproxy: make balancer-deps (.ci/run runs it)")


def recipe() -> Any:
    spec = importlib.util.spec_from_file_location("haproxy_config", REPO / "deploy" / "haproxy_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Balancer:
    """HAProxy in front of the hosts, configured by the recipe; ``url`` makes it a target for ``Load``."""

    def __init__(self, root: Path, hosts: dict[str, Daemon], apis: list[str]) -> None:
        self.port = free_port()
        config = root / "haproxy.cfg"
        self.socket = root / "haproxy.sock"
        config.write_text(recipe().render(f"127.0.0.1:{self.port}", [(n, f"127.0.0.1:{d.port}")
                                                                     for n, d in hosts.items()], apis,
                                          str(self.socket)))
        self.log = (root / "haproxy.log").open("wb")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self.listening, 30, "HAProxy to listen")

    def listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited: {(self.log.name and Path(self.log.name).read_text())[-2000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def states(self) -> dict[tuple[str, str], bool]:
        """Whether HAProxy's health checks have each (backend, host) up, from its stats socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(b"show servers state\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        rows = [line.split() for line in out.decode().splitlines()[2:] if line.strip()]
        return {(row[1], row[3]): row[5] == "2" for row in rows}  # srv_op_state 2: running

    def wait_checked(self, down: set[tuple[str, str]] = frozenset()) -> None:  # type: ignore[assignment]
        """Until HAProxy's checks have every host up for every backend, but those in ``down``."""
        wait_until(lambda: (st := self.states()) and all(up == ((b, h) not in down) for (b, h), up in st.items()),
                   60, f"HAProxy's checks to see every host up but {sorted(down)}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Hosts:
    """Two predictord hosts (h1, h2) with the same predictors, and HAProxy in front."""

    def __init__(self, make_daemon: Callable[..., Daemon], predictors: dict[str, dict[str, str]], apis: list[str],
                 root: Path) -> None:
        self.daemons: dict[str, Daemon] = {}
        for name, files in predictors.items():
            d = make_daemon(files, f"[server]\nport = {free_port()}\ndrain_delay = 3\n[predictors]\ndebounce = 0.3\n",
                            start=False)  # drain_delay as the recipe advises (deploy/haproxy.cfg)
            d.env["HOST_NAME"] = name
            self.daemons[name] = d.start()
        for d in self.daemons.values():
            d.wait_settled()
        self.restarted: list[Daemon] = []
        self.lb = Balancer(root, self.daemons, apis)
        self.lb.wait_checked({(f"api_{name}", host) for host, d in self.daemons.items() for name in apis
                              if d.get(f"/readyz?api={name}").status_code != 200})

    def restart(self, name: str) -> Daemon:
        """Start host ``name`` again, on its port, with its predictors and admin socket."""
        old = self.daemons[name]
        d = Daemon(old.root, old.config_text, dict(old.env))
        self.restarted.append(d)
        self.daemons[name] = d.start()
        return d

    def answered_by(self, load: Load, api: str, since: float, host: str, n: int = 10) -> bool:
        return sum(1 for o in load.of(api) if o.sent >= since and o.status == 200 and o.body["host"] == host) >= n

    def close(self) -> None:
        self.lb.stop()
        for d in self.restarted:
            d.stop()


@pytest.fixture
def hosts(make_daemon: Callable[..., Daemon], tmp_path: Path) -> Iterator[Callable[..., Hosts]]:
    made: list[Hosts] = []

    def make(predictors: dict[str, dict[str, str]], apis: list[str]) -> Hosts:
        made.append(Hosts(make_daemon, predictors, apis, tmp_path))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_a_host_stopped_under_load_and_started_again_loses_nothing(hosts: Callable[..., Hosts]) -> None:
    h = hosts({"h1": {"who.py": WHO}, "h2": {"who.py": WHO}}, ["who"])
    with Load(h.lb, {"who": 4}, seconds=180) as load:  # type: ignore[arg-type]
        wait_until(lambda: h.answered_by(load, "who", 0, "h1") and h.answered_by(load, "who", 0, "h2"), 60,
                   "both hosts answering through HAProxy")
        first = h.daemons["h1"]
        assert first.stop(signal.SIGTERM) == 0, "the host drained and stopped cleanly"
        down = load.outcomes[-1].done
        wait_until(lambda: h.answered_by(load, "who", down, "h2", 50), 60, "h2 taking all the traffic")
        h.restart("h1").wait_settled()
        back = load.outcomes[-1].done
        wait_until(lambda: h.answered_by(load, "who", back, "h1", 20), 60, "traffic back on h1 once it is ready")
    assert load.failures("who") == [], "no request failed through HAProxy while a host restarted"


def test_a_new_version_rolled_host_by_host_loses_nothing(hosts: Callable[..., Hosts]) -> None:
    h = hosts({"h1": {"who.py": WHO}, "h2": {"who.py": WHO}}, ["who"])
    old = {n: d.get("/who").json()["version"]["wanted"] for n, d in h.daemons.items()}
    assert old["h1"] == old["h2"], "the same files are the same version on every host"
    new = {}
    with Load(h.lb, {"who": 4}, seconds=180) as load:  # type: ignore[arg-type]
        wait_until(lambda: load.count("who") > 50, 30, "load through HAProxy")
        for name, d in h.daemons.items():  # host 1, then host 2
            d.write("who.toml", "[config]\nrelease = 2\n")
            wait_until(lambda d=d: d.post("/who", json={}).json()["release"] == 2, 60, f"{name} serving release 2")
            new[name] = d.get("/who").json()["version"]["wanted"]
            since = load.outcomes[-1].done
            wait_until(lambda s=since: load.count("who") > len([o for o in load.of("who") if o.sent < s]) + 30, 30,
                       "more load")
        done = load.outcomes[-1].done
        wait_until(lambda: sum(1 for o in load.of("who") if o.sent > done) > 30, 30, "load on release 2 only")
    assert load.failures("who") == [], "no request failed during the rollout"
    assert new["h1"] == new["h2"]
    seen = {o.version for o in load.of("who")}
    assert seen == {old["h1"], new["h1"]}, "every answer carries the old or the new version"
    assert {o.body["release"] for o in load.of("who") if o.sent > done} == {2}


def test_a_broken_version_on_one_host_keeps_the_old_one_serving_there(hosts: Callable[..., Hosts]) -> None:
    h = hosts({"h1": {"who.py": WHO}, "h2": {"who.py": WHO}}, ["who"])
    with Load(h.lb, {"who": 4}, seconds=180) as load:  # type: ignore[arg-type]
        wait_until(lambda: load.count("who") > 50, 30, "load through HAProxy")
        h1 = h.daemons["h1"]
        h1.write("who.py", BROKEN)
        wait_until(lambda: h1.get("/who").json()["error"], 60, "h1 to refuse the broken version")
        since = load.outcomes[-1].done
        wait_until(lambda: h.answered_by(load, "who", since, "h1", 30), 60, "h1 still answering")
    assert load.failures("who") == [], "a broken version on one host fails nothing"
    assert h1.get("/readyz?api=who").status_code == 200, "its old version is ready: it stays in rotation"


def test_an_api_failed_on_one_host_goes_to_the_other_and_that_host_serves_the_rest(
        hosts: Callable[..., Hosts]) -> None:
    h = hosts({"h1": {"who.py": WHO, "other.py": WHO.replace("who", "other"), "sick.py": BROKEN},
               "h2": {"who.py": WHO, "other.py": WHO.replace("who", "other"), "sick.py": WHO}},
              ["who", "other", "sick"])
    h1 = h.daemons["h1"]
    assert h1.get("/sick").json()["state"] == "failed"
    assert h1.get("/readyz").status_code == 200, "one API failed for its own files keeps the host in rotation"
    assert h1.get("/readyz?api=sick").status_code == 503
    with Load(h.lb, {"sick": 3, "who": 3}, seconds=180) as load:  # type: ignore[arg-type]
        wait_until(lambda: h.answered_by(load, "who", 0, "h1", 30) and h.answered_by(load, "sick", 0, "h2", 30), 60,
                   "sick answered by h2 and who by h1")
    assert load.failures("sick") == [] and load.failures("who") == []
    assert {o.body["host"] for o in load.of("sick")} == {"h2"}, "the failed API's requests all went to h2"
    assert {o.body["host"] for o in load.of("who")} == {"h1", "h2"}, "h1 still served its other APIs"


def test_the_example_configuration_is_the_recipes_output_and_haproxy_accepts_it(tmp_path: Path) -> None:
    example = (REPO / "deploy" / "haproxy.cfg").read_text()
    servers = dict(re.findall(r"^    server (\S+) (\S+) check$", example, re.M))  # the hosts it names
    assert len(servers) == 2
    assert example == recipe().render(":80", list(servers.items()), ["hello", "mlp"]), \
        "regenerate deploy/haproxy.cfg (see the command in README, 'More than one machine')"
    checked = subprocess.run(["haproxy", "-c", "-f", str(REPO / "deploy" / "haproxy.cfg")], capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
