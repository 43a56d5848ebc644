"""The Ray suite's fixtures (rayharness.py). It needs the `ray` extra: `make ray-test` builds its own venv
(.venv-ray) and runs it; without ray it is skipped."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: see cluster.before_ray
pytest.importorskip("ray", reason="needs the ray extra: make ray-test")
from rayharness import RayCluster, RayServe  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    c = RayCluster()
    yield c
    c.shutdown()


@pytest.fixture
def ray_serve(ray_cluster: RayCluster, tmp_path: Path) -> Iterator[Callable[[dict[str, str]], RayServe]]:
    made: list[RayServe] = []

    def make(predictors: dict[str, str]) -> RayServe:
        made.append(RayServe(tmp_path / f"r{len(made)}", ray_cluster, predictors))
        return made[-1]

    yield make
    for r in made:
        r.stop()


