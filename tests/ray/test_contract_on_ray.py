"""The daemon's contract tests (tests/integration/test_contract.py, the ones in its SHARED list), run unchanged
against `predictord ray` serving the same predictors on a two-node Ray cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_contract
from rayharness import RayCluster, RayServe

for _name in test_contract.SHARED:
    globals()[_name] = getattr(test_contract, _name)  # collected here, with this module's `daemon`


@pytest.fixture(scope="module")
def daemon(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServe]:
    r = RayServe(tmp_path_factory.mktemp("contract-on-ray"), ray_cluster, test_contract.PREDICTORS)
    r.wait_ready(["aio", "echo", "form", "kinds", "post"])
    yield r
    r.stop()


def test_every_api_serves_on_ray(daemon: RayServe) -> None:
    apis = daemon.apis()
    assert {n: a["state"] for n, a in apis.items()} == dict.fromkeys(["aio", "echo", "form", "kinds", "post"],
                                                                      "ready")
    assert daemon.get("/").json()["apis"].keys() == apis.keys(), "GET / lists the APIs"
    kinds = daemon.post("/kinds", json={"kind": "number"})
    assert kinds.headers["x-predictor-version"] == apis["kinds"]["serving"]
