"""`predictord ray` keeps a two-node Ray cluster in step with the predictors directory: replicas on both nodes, a
rolling update under load with nothing lost, a broken edit that keeps the old version serving, a delete, and the
loss of a node under load (last: it takes the second node away)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
from harness import Load, wait_until
from rayharness import RayCluster, RayServe, status_json

WHO = '''
import os


class PythonPredictor:
    def __init__(self, config):
        self.release = config.get("release", 1)

    def predict(self, payload):
        return {"pid": os.getpid(), "release": self.release}
'''
TWO = "[serving]\nreplicas = 2\n"


def nodes_of(r: RayServe, api: str) -> dict[int, str]:
    """pid -> node id of each running replica of an API (`predictord status --ray --json`)."""
    return {rep["pid"]: rep["node"] for rep in status_json(r)["apis"][api]["replicas"]}


def test_a_two_replica_api_answers_from_both_nodes(ray_serve: Callable[[dict[str, str]], RayServe],
                                                  ray_cluster: RayCluster) -> None:
    r = ray_serve({"who.py": WHO, "who.toml": TWO})
    r.wait_ready(["who"])
    placed = wait_until(lambda: len(set((p := nodes_of(r, "who")).values())) == 2 and p, 120, "replicas on 2 nodes")
    assert set(placed.values()) == ray_cluster.node_ids(), "one replica on the head, one on the second node"
    # Each node runs a proxy on the port and prefers its own node's replica: new connections reach both proxies.
    seen = wait_until(lambda: len(pids := {httpx.post(r.url("/who"), json={}, headers={"Connection": "close"},
                                                      timeout=30).json()["pid"] for _ in range(40)}) == 2 and pids,
                      60, "answers from both replicas")
    print("replicas:", json.dumps({pid: placed[pid] for pid in seen}))
    assert {placed[pid] for pid in seen} == ray_cluster.node_ids(), "answers came from both nodes"
    table = r.status().stdout
    assert table.splitlines()[0].split()[:3] == ["API", "SERVE", "VERSION"] and "who  RUNNING" in table, table


def test_an_edit_under_load_is_a_rolling_update_and_a_broken_one_keeps_the_old_version(
        ray_serve: Callable[[dict[str, str]], RayServe]) -> None:
    r = ray_serve({"who.py": WHO, "who.toml": TWO})
    old = r.wait_ready(["who"])["who"]["serving"]
    with Load(r, {"who": 4}, seconds=300) as load:  # type: ignore[arg-type]
        wait_until(lambda: load.count("who") > 30, 60, "load on who")
        r.write("who.toml", TWO + "[config]\nrelease = 2\n")
        new = wait_until(lambda: (a := r.apis()["who"])["serving"] != old and a["serving"], 180, "the new version")
        wait_until(lambda: sum(1 for o in load.of("who") if o.status == 200 and o.body["release"] == 2) > 30, 60,
                   "answers from the new version")
        r.write("who.py", "class PythonPredictor:\n    def predict(self, payload)\n        return 1\n")
        error = wait_until(lambda: r.apis()["who"]["error"], 60, "the broken edit refused")
        since = load.outcomes[-1].done
        wait_until(lambda: sum(1 for o in load.of("who") if o.sent > since and o.status == 200) > 30, 60,
                   "the old version answering after the broken edit")
    assert load.failures("who") == [], "no request failed during the rolling update or after the broken edit"
    assert {o.version for o in load.of("who")} == {old, new}, "every answer came from the old or the new version"
    assert error["file"] == str(r.predictors / "who.py") and error["line"] == 2 and "syntax error" in error["message"]
    shown = r.status().stdout
    assert f"{r.predictors / 'who.py'}:2: syntax error" in shown, shown
    assert r.apis()["who"]["serving"] == new and r.post("/who", json={}).json()["release"] == 2


def test_a_deleted_predictor_is_a_404(ray_serve: Callable[[dict[str, str]], RayServe]) -> None:
    r = ray_serve({"gone.py": WHO, "stays.py": WHO})
    r.wait_ready(["gone", "stays"])
    (r.predictors / "gone.py").unlink()
    wait_until(lambda: r.post("/gone", json={}).status_code == 404, 120, "gone to answer 404")
    assert "GET / lists the APIs" in r.post("/gone", json={}).json()["error"]
    assert r.post("/stays", json={}).status_code == 200
    wait_until(lambda: "gone" not in r.apis(), 30, "gone out of the driver's registry")


def test_losing_the_second_node_under_load_leaves_the_head_serving(
        ray_serve: Callable[[dict[str, str]], RayServe], ray_cluster: RayCluster) -> None:
    r = ray_serve({"who.py": WHO, "who.toml": TWO})
    r.wait_ready(["who"])
    placed = wait_until(lambda: len(set((p := nodes_of(r, "who")).values())) == 2 and p, 120, "replicas on 2 nodes")
    head = next(iter(ray_cluster.node_ids() - {ray_cluster.second.node_id}))
    with Load(r, {"who": 4}, seconds=300) as load:  # type: ignore[arg-type]
        wait_until(lambda: load.count("who") > 30, 60, "load on who")
        lost = load.outcomes[-1].done
        ray_cluster.cluster.remove_node(ray_cluster.second)
        wait_until(lambda: sum(1 for o in load.of("who") if o.sent > lost and o.status == 200) > 50, 120,
                   "the head's replica answering")
        settled = load.outcomes[-1].done
        wait_until(lambda: sum(1 for o in load.of("who") if o.sent > settled) > 50, 60, "more load")
    after = [o for o in load.of("who") if o.sent > settled]
    failed = [o for o in load.of("who") if o.sent > lost and o.status != 200]
    figures: dict[str, Any] = {"requests_after_the_loss": len([o for o in load.of("who") if o.sent > lost]),
                               "failed": len(failed), "failures": sorted({o.error[:80] for o in failed})}
    print("node loss:", json.dumps(figures))
    assert all(o.status == 200 for o in after), "once Serve noticed, every request was answered"
    assert {placed.get(o.body["pid"], head) for o in after} == {head}, "by the head's replica"
