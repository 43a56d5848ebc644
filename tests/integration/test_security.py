"""Bearer tokens on the predict and admin routes, and error text that keeps the machine's secrets."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from broken import OK
from harness import Daemon

PREDICT_TOKEN = "p-7f3a9c1e5b"
ADMIN_TOKEN = "a-0d8e2b6f4c"
SECRET = "s3cr3t-v4lue-9q8w"
LEAKY = '''
import os


class PythonPredictor:
    def __init__(self, config):
        raise RuntimeError("cannot open /etc/predictord-private/key.pem with " + os.environ["LEAKY_SECRET"])

    def predict(self, payload):
        return 1
'''
RAISES = '''
import os


class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        raise OSError("/var/lib/private/db: " + os.environ["LEAKY_SECRET"])
'''


def _token_file(root: Path, name: str, token: str, mode: int = 0o600) -> Path:
    path = root / name
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("security")
    _token_file(root, "predict.token", PREDICT_TOKEN)
    _token_file(root, "admin.token", ADMIN_TOKEN)
    d = Daemon(root, '[server]\nauth_token_file = "predict.token"\nadmin_token_file = "admin.token"\n',
               env={"LEAKY_SECRET": SECRET})
    d.write("ok.py", OK)
    d.write("leaky.py", LEAKY)
    d.write("raises.py", RAISES)
    d.start()
    d.client.headers["authorization"] = f"Bearer {ADMIN_TOKEN}"
    d.wait_settled()
    yield d
    d.stop()


def test_predict_needs_its_token(daemon: Daemon) -> None:
    url = daemon.url("/ok")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {PREDICT_TOKEN}"},
                    {"Authorization": f"Bearer {ADMIN_TOKEN}"}, {"Authorization": f"Bearer {PREDICT_TOKEN}x"}):
        r = daemon.client.post(url, json={}, headers={"Authorization": "", **headers})
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer" and "auth_token_file" in r.json()["error"]
    for scheme in ("Bearer", "bearer"):
        r = daemon.client.post(url, json={}, headers={"Authorization": f"{scheme} {PREDICT_TOKEN}"})
        assert r.status_code == 200 and r.json() == {"ok": True}


def test_admin_routes_need_theirs_and_probes_stay_open(daemon: Daemon) -> None:
    for path in ("/", "/ok", "/metrics", "/openapi.json"):
        r = daemon.client.get(daemon.url(path), headers={"Authorization": f"Bearer {PREDICT_TOKEN}"})
        assert r.status_code == 401 and "admin_token_file" in r.json()["error"], path
        assert daemon.get(path).status_code == 200, path
    assert daemon.client.get(daemon.url("/healthz"), headers={"Authorization": ""}).status_code == 200
    assert daemon.client.get(daemon.url("/readyz"), headers={"Authorization": ""}).status_code in (200, 503)
    doc = daemon.get("/openapi.json").json()
    assert doc["paths"]["/ok"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]


def test_status_command_uses_the_admin_socket_without_a_token(daemon: Daemon) -> None:
    cmd = [sys.executable, "-m", "predictord", "status", "--json", "--config", str(daemon.config_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)["apis"]) == {"ok", "leaky", "raises"}


def test_error_bodies_hide_outside_paths_and_environment_values(daemon: Daemon) -> None:
    auth = {"Authorization": f"Bearer {PREDICT_TOKEN}"}
    failed = daemon.client.post(daemon.url("/leaky"), json={}, headers=auth)
    assert failed.status_code == 503
    error = failed.json()["error"]
    assert str(daemon.predictors / "leaky.py") in error, "the user's own file is named"
    assert "<a path outside the predictors directory>" in error and "<an environment value>" in error, error
    crashed = daemon.client.post(daemon.url("/raises"), json={}, headers=auth)
    assert crashed.status_code == 500 and "OSError" in crashed.json()["error"]
    for text in (failed.text, crashed.text, daemon.get("/leaky").text, daemon.get("/").text):
        assert SECRET not in text and "/etc/predictord-private" not in text and "/var/lib/private" not in text
        assert "Traceback" not in text
    logs = daemon.logs()  # the operator still has the whole story
    assert "/etc/predictord-private/key.pem" in logs and SECRET in logs


@pytest.mark.parametrize("mode,content,says", [
    (0o644, "tok", "mode 0644 lets anyone read the token. Fix: chmod o-r"),
    (0o600, "", "expected one line of printable ASCII without spaces, found nothing"),
    (0o600, "two words", "found other characters"),
    (None, "", "cannot read it: No such file or directory"),
])
def test_unusable_token_files_stop_the_daemon_with_the_fix(tmp_path: Path, mode: int | None, content: str,
                                                           says: str) -> None:
    if mode is not None:
        _token_file(tmp_path, "t.token", content, mode)
    config = tmp_path / "config.toml"
    config.write_text('[server]\nauth_token_file = "t.token"\n')
    r = subprocess.run([sys.executable, "-m", "predictord", "--config", str(config)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith(f"predictord: {config}: [server]: auth_token_file: {tmp_path / 't.token'}: ")
    assert says in r.stderr
