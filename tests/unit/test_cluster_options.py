"""[serving] onto Ray Serve's deployment options (cluster/options.py): a pure mapping, no ray needed."""

from __future__ import annotations

from predictord.cluster.options import REPLICA_QUEUE, serve_options
from predictord.config import ServingConfig


def test_defaults_map_to_one_fixed_replica_of_one_cpu() -> None:
    o = serve_options(ServingConfig(), 1.0, 0)
    assert o.deployment == {"ray_actor_options": {"num_cpus": 1.0}, "num_replicas": 1,
                            "max_ongoing_requests": 1 + REPLICA_QUEUE, "max_queued_requests": 128,
                            "health_check_period_s": 10.0}
    assert o.batch is None and o.warnings == []


def test_max_replicas_above_replicas_is_serves_autoscaler() -> None:
    o = serve_options(ServingConfig(replicas=2, max_replicas=6, threads=4), 0.5, 0)
    assert "num_replicas" not in o.deployment
    assert o.deployment["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 4}
    assert o.deployment["max_ongoing_requests"] == 4 + REPLICA_QUEUE


def test_devices_batching_and_what_does_not_map() -> None:
    gpu = serve_options(ServingConfig(device="gpu", max_batch_size=8, batch_wait_ms=5), 1.0, 0)
    assert gpu.deployment["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert gpu.batch == (8, 0.005) and gpu.deployment["max_ongoing_requests"] == 8 + REPLICA_QUEUE
    assert gpu.warnings == ['device = "gpu", and the cluster has no GPU: its replicas wait for one']
    assert serve_options(ServingConfig(device="any"), 1.0, 2).deployment["ray_actor_options"]["num_gpus"] == 1
    assert "num_gpus" not in serve_options(ServingConfig(device="any"), 1.0, 0).deployment["ray_actor_options"]
    none = serve_options(ServingConfig(queue_limit=0), 1.0, 0)
    assert none.deployment["max_queued_requests"] == 1 and "queue_limit = 0" in none.warnings[0]
