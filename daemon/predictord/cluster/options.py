"""An API's [serving] settings as Ray Serve deployment options: a pure mapping, with a warning for each setting that
Serve cannot honour as the daemon does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import ServingConfig

# Requests a replica holds beyond the ones it runs: its predict() calls wait in its own queue, as in a model worker.
# With max_ongoing_requests = threads alone, Serve's router held the rest and retried with back-off: echo on 2
# replicas (bench/ray_bench.py) 52 req/s at 8 clients and 15 with timeouts at 64, against 125 and 104 with 16 more.
REPLICA_QUEUE = 16


@dataclass(frozen=True)
class ServeOptions:
    """What ``serve.deployment(...).options(...)`` gets, what the replica does itself, and what does not map."""

    deployment: dict[str, Any]
    batch: tuple[int, float] | None  # (max_batch_size, batch_wait_timeout_s): serve.batch
    warnings: list[str] = field(default_factory=list)


def serve_options(serving: ServingConfig, replica_cpus: float, cluster_gpus: float) -> ServeOptions:
    """``[serving]`` onto Serve: replicas and max_replicas onto the autoscaler's bounds (fixed when max_replicas is
    not above replicas), device onto one GPU per replica, threads (x the batch size, + REPLICA_QUEUE) onto
    max_ongoing_requests,
    queue_limit onto max_queued_requests, batching onto serve.batch. The timeout is the replica's own (504)."""
    warnings: list[str] = []
    gpu = serving.device == "gpu" or (serving.device == "any" and cluster_gpus > 0)
    if serving.device == "gpu" and cluster_gpus <= 0:
        warnings.append('device = "gpu", and the cluster has no GPU: its replicas wait for one')
    actor: dict[str, Any] = {"num_cpus": replica_cpus}
    if gpu:
        actor["num_gpus"] = 1
    options: dict[str, Any] = {"ray_actor_options": actor,
                               "max_ongoing_requests": serving.threads * serving.max_batch_size + REPLICA_QUEUE}
    if serving.max_replicas > serving.replicas:
        options["autoscaling_config"] = {"min_replicas": serving.replicas, "max_replicas": serving.max_replicas,
                                         "target_ongoing_requests": serving.threads * serving.max_batch_size}
    else:
        options["num_replicas"] = serving.replicas
    if serving.queue_limit >= 1:
        options["max_queued_requests"] = serving.queue_limit
    else:
        options["max_queued_requests"] = 1
        warnings.append("queue_limit = 0 has no Serve equivalent (its smallest queue is 1 request): 1")
    if serving.health_interval > 0:  # a replica whose health() fails is replaced at its first failure
        options["health_check_period_s"] = serving.health_interval
    if serving.health_failures != 3:
        warnings.append(f"health_failures = {serving.health_failures} has no Serve equivalent: Serve replaces a "
                        "replica at its first failed health check")
    batch = None
    if serving.max_batch_size > 1:
        batch = (serving.max_batch_size, serving.batch_wait_ms / 1000)
    return ServeOptions(options, batch, warnings)
