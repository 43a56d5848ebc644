"""A real local Ray cluster on loopback (a head and a second node, 1 CPU each: ray.cluster_utils.Cluster), and
`predictord ray` against it, as a subprocess serving a temp predictors directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from harness import free_port, wait_until

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback stays loopback (cluster.before_ray)
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}


class RayCluster:
    """The cluster, this test process connected to it as a driver, and the one HTTP port Serve's proxies use."""

    def __init__(self) -> None:
        self.cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        self.second = self.cluster.add_node(**NODE)
        self.address = self.cluster.address
        self.port = free_port()  # Serve's proxies take the first driver's port for the cluster's life
        ray.init(address=self.address, namespace="predictord", log_to_driver=False, logging_level="ERROR")

    def node_ids(self) -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    def shutdown(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()


class RayServe:
    """`predictord ray` over a predictors directory of its own; the Daemon-like surface the contract tests use."""

    def __init__(self, root: Path, cluster: RayCluster, predictors: dict[str, str]) -> None:
        self.root, self.cluster = root, cluster
        self.predictors = root / "predictors"
        for rel, text in predictors.items():
            self.write(rel, text)
        self.config_path = root / "config.toml"
        self.config_path.write_text(f'[server]\nhost = "127.0.0.1"\nport = {cluster.port}\n[predictors]\n'
                                    'dir = "predictors"\ncheck_permissions = false\ndebounce = 0.3\n')
        self.log_path = root / "driver.log"
        self.client = httpx.Client(timeout=60)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "predictord", "ray", "--address", cluster.address,
                                          "--config", str(self.config_path), "--replica-cpus", "0.05"],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def write(self, rel: str, text: str) -> Path:
        path = self.predictors / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.cluster.port}{path}"

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(self.url(path), **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.post(self.url(path), **kw)

    def apis(self) -> dict[str, Any]:
        """What the driver says of each API (its registry actor)."""
        from predictord.cluster.registry import registry

        return dict(ray.get(registry().apis.remote())["apis"])

    def wait_ready(self, names: list[str], timeout: float = 180) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"predictord ray exited:\n{self.log_path.read_text()[-3000:]}")
            apis = self.apis()
            ok = all(n in apis and apis[n]["state"] == "ready" and apis[n]["serving"] == apis[n]["wanted"]
                     for n in names)
            return apis if ok else None

        return wait_until(ready, timeout, f"APIs {names} serving on Ray")  # type: ignore[no-any-return]

    def status(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "predictord", "status", "--ray", "--address",
                               self.cluster.address, *args], capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        """Stop the driver, and delete the applications it deployed (the next test's driver starts clean)."""
        from ray import serve

        names = list(self.apis())
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        from predictord.cluster.registry import registry

        for name in names:
            serve.delete(name)
            ray.get(registry().drop.remote(name))
        self.client.close()


def status_json(r: RayServe) -> dict[str, Any]:
    out = r.status("--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]
