"""The daemon's own OpenAPI description (GET /openapi.json), and schemathesis fuzzing the daemon against it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from harness import Daemon
from hypothesis import HealthCheck, given, settings

ECHO = '''
class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        return {"type": type(payload).__name__, "size": len(payload) if hasattr(payload, "__len__") else None}
'''
TEXT = '''
class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload, query_params):
        return f"{type(payload).__name__} {dict(query_params)}"
'''


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("openapi"), "[server]\nmax_body_bytes = 100000\n")
    d.write("echo.py", ECHO)
    d.write("text.py", TEXT)
    d.write("text.toml", "[serving]\ntimeout = 5\n")
    d.start()
    d.wait_settled()
    yield d
    assert "Traceback" not in d.logs()
    d.stop()


def test_document_lists_own_routes_and_each_api(daemon: Daemon) -> None:
    doc = daemon.get("/openapi.json").json()
    assert doc["openapi"] == "3.1.0"
    assert {"/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/echo", "/text"} == set(doc["paths"])
    echo = doc["paths"]["/echo"]["post"]
    assert {"200", "400", "413", "500", "502", "503", "504"} <= set(echo["responses"])
    assert "Requests past 60s get 504." in echo["description"]
    assert "Requests past 5s get 504." in doc["paths"]["/text"]["post"]["description"]
    assert "security" not in echo, "no token configured"


def test_daemon_conforms_to_its_own_description(daemon: Daemon) -> None:
    """Every operation, with bodies, queries and headers generated from the description: no 5xx, and every status,
    content type, header and body as documented. (schemathesis's pytest loader does not work under pytest 9, so
    its strategies run under hypothesis directly.)"""
    schema = schemathesis.openapi.from_url(daemon.url("/openapi.json"))
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}  # schemathesis leaves out the document's own route
    assert labels == {"GET /", "GET /healthz", "GET /readyz", "GET /metrics", "POST /echo", "GET /echo", "POST /text",
                      "GET /text"}, labels

    for operation in operations:
        @given(operation.as_strategy())
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def conforms(case: Any) -> None:
            case.call_and_validate()

        conforms()
