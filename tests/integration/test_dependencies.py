"""A predictor brings its own dependencies: requirements.txt (or [dependencies] pip) installed into an environment
of its own, in the background, from a local wheelhouse of tiny packages made here (no index, no network)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import Daemon, Load, cmdline, wait_until
from wheels import make_wheel

USES = '''
import os

import {module}


class PythonPredictor:
    def predict(self, payload):
        return {{"version": {module}.VERSION, "pid": os.getpid()}}
'''

SEES = '''
class PythonPredictor:
    def predict(self, payload):
        try:
            import tinypkg
        except ImportError:
            return {"version": None}
        return {"version": tinypkg.VERSION}
'''


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    house = tmp_path / "wheelhouse"
    for version in ("1.0", "2.0"):
        make_wheel(house, "tinypkg", version)
    make_wheel(house, "tinybase", "2.0")
    make_wheel(house, "helperlib", "0.1", requires=("tinypkg>=1",))
    return house


def config(house: Path, extra: str = "") -> str:
    return (f'[predictors]\ndebounce = 0.3\nfind_links = ["{house}"]\nno_index = true\ninstall_timeout = 120\n'
            + extra)


def answer(d: Daemon, name: str) -> Any:
    r = d.post(f"/{name}", json={})
    return r.json() if r.status_code == 200 else None


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "predictord", *args, "--config", str(d.config_path)],
                          capture_output=True, text=True, timeout=120)


def test_two_apis_pin_two_versions_of_one_package_and_a_third_sees_neither(
        make_daemon: Callable[..., Daemon], wheelhouse: Path) -> None:
    d = make_daemon({"one/predictor.py": USES.format(module="tinypkg"), "one/requirements.txt": "tinypkg==1.0\n",
                     "two.py": USES.format(module="tinypkg"),
                     "two.toml": '[dependencies]\npip = ["tinypkg==2.0", "helperlib"]\n', "plain.py": SEES},
                    config(wheelhouse))
    status = d.wait_settled(120)
    assert {n: a["state"] for n, a in status["apis"].items()} == {"one": "ready", "two": "ready", "plain": "ready"}
    one, two = answer(d, "one"), answer(d, "two")
    assert one["version"] == "1.0" and two["version"] == "2.0"
    assert answer(d, "plain") == {"version": None}, "an API without requirements sees none of theirs"
    workers = {w["pid"]: w for w in d.status()["workers"]}
    assert one["pid"] != two["pid"] and workers[one["pid"]]["apis"] == {"one": status["apis"]["one"]["version"]
                                                                           ["wanted"]}
    assert workers[one["pid"]]["dedicated"] == "one" and workers[one["pid"]]["env"]
    env = d.get("/two").json()["environment"]
    assert env["phase"] == "ready" and env["installer"] == "pip" and env["fresh_interpreter"] is False
    shown = cli(d, "status").stdout
    assert "one (dedicated, its own environment)" in shown, shown


class GatedIndex:
    """A find-links page on loopback whose wheels are held until the test opens the gate: an install that takes as
    long as the test wants."""

    def __init__(self, house: Path) -> None:
        self.gate = threading.Event()
        index = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kw: Any) -> None:
                super().__init__(*args, directory=str(house), **kw)

            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                if self.path.endswith(".whl"):
                    index.gate.wait(120)
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[GatedIndex]:
    house = tmp_path / "slowhouse"
    make_wheel(house, "slowpkg", "1.0")
    index = GatedIndex(house)
    yield index
    index.close()


def test_editing_requirements_under_load_builds_while_the_old_version_serves(
        make_daemon: Callable[..., Daemon], wheelhouse: Path, gated: GatedIndex) -> None:
    d = make_daemon({"a/predictor.py": USES.format(module="tinypkg"), "a/requirements.txt": "tinypkg==1.0\n"},
                    config(wheelhouse).replace(f'["{wheelhouse}"]', f'["{wheelhouse}", "{gated.url}"]'))
    d.wait_settled(120)
    with Load(d, {"a": 2}, seconds=180) as load:
        wait_until(lambda: load.count("a") > 20, 30, "load on a")
        d.write("a/requirements.txt", "tinypkg==2.0\nslowpkg==1.0\n")
        building = wait_until(lambda: (e := d.get("/a").json()["environment"]) and e["phase"] == "building" and e,
                              30, "the new environment building")
        assert building["elapsed"] >= 0
        wait_until(lambda: d.get("/a").json()["environment"]["last_line"], 30, "the installer's last line")
        assert d.get("/a").json()["check"].startswith("installing its requirements with pip (")
        assert "installing its requirements with pip" in cli(d, "status").stdout
        assert answer(d, "a")["version"] == "1.0", "the old version serves while the new environment builds"
        gated.gate.set()
        wait_until(lambda: answer(d, "a")["version"] == "2.0", 60, "the new version with the new package")
        since = load.count("a")
        wait_until(lambda: load.count("a") > since + 20, 30, "more load on the new version")
    assert load.failures("a") == [], "no request failed while the environment was rebuilt"
    assert {o.body["version"] for o in load.of("a")} == {"1.0", "2.0"}


def test_a_requirement_that_cannot_be_installed_fails_that_version_and_the_old_one_serves(
        make_daemon: Callable[..., Daemon], wheelhouse: Path) -> None:
    d = make_daemon({"a/predictor.py": USES.format(module="tinypkg"), "a/requirements.txt": "tinypkg==1.0\n"},
                    config(wheelhouse))
    d.wait_settled(120)
    d.write("a/requirements.txt", "tinypkg==1.0\nnosuchpkg==3.1\n")
    failed = wait_until(lambda: (a := d.get("/a").json())["error"] and a, 60, "the install to fail")
    error = failed["error"]
    assert error["kind"] == "install" and error["file"] == str(d.predictors / "a" / "requirements.txt")
    assert "nosuchpkg==3.1" in error["message"] and len(error["message"]) < 600, error
    assert failed["state"] == "ready" and answer(d, "a")["version"] == "1.0", "the old version keeps serving"
    assert failed["environment"]["phase"] == "failed"
    d.wait_for_log(r"API a version \w+: installing its requirements .* failed: .*nosuchpkg==3\.1")
    d.write("a/requirements.txt", "tinypkg==2.0\n")
    wait_until(lambda: answer(d, "a")["version"] == "2.0", 60, "the fixed version")
    assert d.get("/a").json()["error"] is None


def test_a_pin_of_a_module_the_master_preloads_starts_its_workers_from_a_fresh_interpreter(
        make_daemon: Callable[..., Daemon], wheelhouse: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "tinybase").mkdir(parents=True)
    (base / "tinybase" / "__init__.py").write_text("VERSION = '1.0'\n")  # the daemon's own: preloaded
    d = make_daemon({"pinned.py": USES.format(module="tinybase"), "pinned.toml": '[dependencies]\npip = '
                     '["tinybase==2.0"]\n', "shared.py": USES.format(module="tinybase")},
                    config(wheelhouse, '[workers]\npreload = ["torch", "tinybase"]\n'), start=False)
    d.env["PYTHONPATH"] = str(base)
    d.start()
    d.wait_settled(120)
    assert answer(d, "shared")["version"] == "1.0"
    pinned = answer(d, "pinned")
    assert pinned["version"] == "2.0", "its own version, though the master imported another"
    env = d.get("/pinned").json()["environment"]
    assert env["fresh_interpreter"] is True and env["own_modules"] == ["tinybase"]
    d.wait_for_log(r"it holds its own tinybase, which the master imported: its workers start from a fresh "
                   r"interpreter")
    assert "pinned (dedicated, its own environment, a fresh interpreter)" in cli(d, "status").stdout
    with open(f"/proc/{pinned['pid']}/cmdline", "rb") as f:
        assert b"predictord.model.main" in f.read(), "an exec'd interpreter, not a fork of the master"
    assert d.stop() == 0


def test_identical_requirements_share_one_environment_and_an_unused_one_is_removed(
        make_daemon: Callable[..., Daemon], wheelhouse: Path) -> None:
    envs = wheelhouse.parent / "envs"
    d = make_daemon({"a/predictor.py": USES.format(module="tinypkg"), "a/requirements.txt": "tinypkg==1.0\n"},
                    config(wheelhouse, f'envs_dir = "{envs}"\nenv_grace = 1\n'))
    d.wait_settled(120)
    key = d.get("/a").json()["environment"]["key"]
    d.write("b/requirements.txt", "tinypkg==1.0\n")
    d.write("b/predictor.py", USES.format(module="tinypkg"))
    wait_until(lambda: answer(d, "b"), 60, "b to serve")
    assert d.get("/b").json()["environment"]["key"] == key
    assert d.logs().count(f"environment {key}: installing") == 1, "b reused a's environment: no second install"
    old = d.get("/a").json()["version"]["wanted"]
    d.write("a/predictor.py", USES.format(module="tinypkg") + "\n# an edit of the code alone\n")
    wait_until(lambda: (v := d.get("/a").json()["version"])["serving"] == [v["wanted"]] != [old], 60, "a's reload")
    assert d.logs().count("installing") == 1, "an unchanged requirements file is never installed again"
    for name in ("a", "b"):
        (d.predictors / name / "predictor.py").unlink()
    wait_until(lambda: not (envs / key).exists(), 60, "the unused environment removed after its grace")
    d.wait_for_log(rf"environment {key}: no version has needed it for [\d.]+s; removing it")


def test_check_builds_the_environment_and_checks_the_predictor_inside_it(
        make_daemon: Callable[..., Daemon], wheelhouse: Path) -> None:
    d = make_daemon({}, config(wheelhouse), start=False)
    d.write_config()
    good = d.write("good/predictor.py", USES.format(module="tinypkg")).parent
    d.write("good/requirements.txt", "helperlib\n")
    bad = d.write("bad/predictor.py", USES.format(module="tinypkg")).parent
    d.write("bad/requirements.txt", "tinypkg==9.9\n")
    ok = cli(d, "check", str(good))
    assert ok.returncode == 0 and "OK: API 'good'" in ok.stdout, ok
    assert "installing" in ok.stderr
    refused = cli(d, "check", str(bad))
    assert refused.returncode == 1 and "tinypkg==9.9" in refused.stderr, refused


def test_an_install_past_its_deadline_is_killed_and_fails_that_version(
        make_daemon: Callable[..., Daemon], wheelhouse: Path, gated: GatedIndex) -> None:
    d = make_daemon({"a/predictor.py": USES.format(module="tinypkg"), "a/requirements.txt": "tinypkg==1.0\n"},
                    config(wheelhouse).replace(f'["{wheelhouse}"]', f'["{wheelhouse}", "{gated.url}"]')
                    .replace("install_timeout = 120", "install_timeout = 3"))
    d.wait_settled(120)
    d.write("a/requirements.txt", "slowpkg==1.0\n")  # its wheel never comes: the gate stays shut
    failed = wait_until(lambda: (a := d.get("/a").json())["error"] and a, 60, "the install to time out")
    assert "took longer than [predictors] install_timeout (3s)" in failed["error"]["message"]
    assert answer(d, "a")["version"] == "1.0", "the old version keeps serving"
    assert not [p for p in psutil.Process(d.proc.pid).children(recursive=True)  # type: ignore[union-attr]
                if "pip" in " ".join(cmdline(p))], "the installer was killed with its builder"
