"""The daemon's contract tests (tests/integration/test_contract.py, the ones in its SHARED list), run unchanged
against `predictord ray` serving the same predictors on a two-node Ray cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import test_contract
from harness import wait_until
from rayharness import RayCluster, RayServe

for _name in test_contract.SHARED:
    globals()[_name] = getattr(test_contract, _name)  # collected here, with this module's `daemon`


@pytest.fixture(scope="module")
def daemon(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServe]:
    r = RayServe(tmp_path_factory.mktemp("contract-on-ray"), ray_cluster, test_contract.PREDICTORS)
    r.wait_ready(["aio", "echo", "files", "form", "kinds", "post"])
    yield r
    r.stop()


def test_every_api_serves_on_ray(daemon: RayServe) -> None:
    apis = daemon.apis()
    assert {n: a["state"] for n, a in apis.items()} == dict.fromkeys(["aio", "echo", "files", "form", "kinds",
                                                                       "post"], "ready")
    assert daemon.get("/").json()["apis"].keys() == apis.keys(), "GET / lists the APIs"
    kinds = daemon.post("/kinds", json={"kind": "number"})
    assert kinds.headers["x-predictor-version"] == apis["kinds"]["serving"]


def test_a_file_response_and_a_background_task_on_ray(daemon: RayServe, tmp_path: Path) -> None:
    """What payload.to_reply makes of a FileResponse, and a Response's background task, through a Ray replica."""
    r = daemon.post("/files", json={"kind": "small"})
    assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"meow\n", "5")
    r = daemon.post("/files", json={"kind": "big"})
    assert r.status_code == 200 and r.content == b"".join(bytes([i]) * 2**20 for i in range(18))
    marker = tmp_path / "sync.txt"
    assert daemon.post("/files", json={"kind": "background", "to": str(marker)}).json() == {"ok": 1}
    wait_until(lambda: marker.exists() and marker.read_text() == "sync", 20, "the background task on Ray")
