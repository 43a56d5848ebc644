"""What `predictord ray` knows that Serve does not (the newest version seen, why one was refused, the warnings of its
settings), kept in a named Ray actor so that `predictord status --ray` can read it from any node; and that status
command itself."""

from __future__ import annotations

import json
import time
from typing import Any

import ray

from ..logs import shown

NAME = "predictord-registry"
NAMESPACE = "predictord"


@ray.remote(num_cpus=0)
class Registry:
    """The driver's view of every API, by name."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.driver: dict[str, Any] = {}

    def put(self, name: str, record: dict[str, Any]) -> None:
        self.state[name] = record

    def drop(self, name: str) -> None:
        self.state.pop(name, None)

    def beat(self, driver: dict[str, Any]) -> None:
        self.driver = {**driver, "beat": time.time()}

    def apis(self) -> dict[str, Any]:
        return {"apis": self.state, "driver": self.driver}


def registry() -> Any:
    """The registry actor, made on first use (detached: it outlives a driver that restarts)."""
    return Registry.options(name=NAME, namespace=NAMESPACE, lifetime="detached",  # type: ignore[attr-defined]
                            get_if_exists=True).remote()


def connect(address: str | None, quiet: bool = False) -> None:
    """Join the Ray cluster at ``address`` (None: $RAY_ADDRESS, or the local one) as a driver (the caller has
    called ``cluster.before_ray``)."""
    ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False,
             logging_level="ERROR" if quiet else "INFO")


def replicas_by_api() -> dict[str, list[dict[str, Any]]]:
    """Every running replica of every application, with its pid and the node it runs on (the Serve controller's
    details: what the dashboard shows, without needing the dashboard)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    out: dict[str, list[dict[str, Any]]] = {}
    for name, app in (details.get("applications") or {}).items():
        for deployment in (app.get("deployments") or {}).values():
            for replica in deployment.get("replicas") or []:
                if str(replica.get("state")).endswith("RUNNING"):
                    out.setdefault(name, []).append({"pid": replica.get("pid"), "node": replica.get("node_id") or "?"})
    return out


def status(address: str | None, as_json: bool) -> int:
    """`predictord status --ray`: every API with its Serve status, version, replicas per node and last error."""
    from ray import serve

    connect(address, quiet=True)
    try:
        known = ray.get(registry().apis.remote())
        serve_status = serve.status().applications
        replicas = replicas_by_api()
    finally:
        ray.shutdown()
    apis: dict[str, Any] = {}
    for name in sorted(set(known["apis"]) | {n for n in serve_status if not n.startswith("predictord-")}):
        record = dict(known["apis"].get(name, {}))
        app = serve_status.get(name)
        record["serve_status"] = str(app.status.value) if app is not None else "NOT DEPLOYED"
        record["serve_message"] = app.message if app is not None else ""
        record["replicas"] = replicas.get(name, [])
        apis[name] = record
    document = {"apis": apis, "driver": known["driver"]}
    if as_json:
        print(json.dumps(document, indent=2, default=str))
        return 0
    rows = [("API", "SERVE", "VERSION", "REPLICAS (NODE)", "LAST ERROR")]
    for name, a in apis.items():
        nodes: dict[str, int] = {}
        for r in a["replicas"]:
            nodes[r["node"][:8]] = nodes.get(r["node"][:8], 0) + 1
        error = a.get("error") or {}
        where = f"{error['file']}:{error['line']}: " if error.get("line") else ""
        rows.append((name, a["serve_status"], a.get("serving") or "-", ", ".join(f"{n}x{k}" for k, n in
                                                                                  sorted(nodes.items())) or "-",
                     (where + error.get("message", "")) if error else a.get("serve_message", "")))
    widths = [max(len(shown(r[i])) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(shown(c).ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + shown(r[4]))
    driver = known["driver"]
    if not driver:
        print("\nno predictord ray driver has run on this cluster")
    elif time.time() - driver.get("beat", 0) < 10:
        print(f"\npredictord ray: pid {driver.get('pid')} on {driver.get('host')}, serving {driver.get('predictors')}")
    else:
        print(f"\npredictord ray: not running (last seen {time.time() - driver.get('beat', 0):.0f}s ago); the "
              "applications above keep serving their last versions")
    return 0
