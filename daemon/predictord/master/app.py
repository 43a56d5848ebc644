"""Wiring: the daemon's config into gunicorn's, the preload, and the master's start."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from .. import logs, metrics, openfiles
from ..config import Config
from ..devices import Device, TraceGpus, discover
from ..http.front import Front
from ..http.guard import Limits
from ..http.safety import Tokens
from ..scoreboard import MAX_HTTP, Scoreboard
from .arbiter import Master
from .notify import Notifier
from .placement import plan_slots

log = logging.getLogger("predictord.master")
def preload(modules: tuple[str, ...]) -> None:
    """Import libraries once in the master, so every forked worker shares them copy-on-write."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            log.warning("preload: cannot import %s (%s); workers will import it themselves", name, e)
            continue
        if name == "torch":
            # A parallel op in the master makes forked children hang on their next one: stay single-threaded.
            module.set_num_threads(1)
        log.info("preloaded %s", name)
    # CPython's recipe for fork-based servers: move everything imported so far to the permanent generation, so no
    # child's garbage collector walks it (a full collection took 64-79 ms over torch's ~170,000 objects) or writes
    # to its pages (which un-shares them: PSS 266 -> 350 MB per worker after load).
    gc.collect()
    gc.freeze()


class PredictordApp(BaseApplication):  # type: ignore[misc]
    """gunicorn's application: settings from config.toml, the ASGI front as the app."""

    def __init__(self, config: Config, reload: Callable[[], Config]) -> None:
        self.pconfig = config
        self.reload_config = reload
        self.preloaded = False
        self.runtime = Path(tempfile.mkdtemp(prefix="predictord-", dir=os.environ.get("RUNTIME_DIRECTORY")))
        metrics.prepare(self.runtime / "metrics")
        metrics.get()  # created in the master, so every forked worker writes to its own files in that folder
        self.scoreboard = Scoreboard(config.predictors.max_apis)
        self.scoreboard.http_slots = min(MAX_HTTP, config.server.http_workers * 2 + 2)
        self.devices = self.roll_devices({}, config)
        # Every worker process needs a core now and then; torch threads beyond a worker's share only contend.
        cores = len(os.sched_getaffinity(0))
        share = cores // max(1, len(self.devices) + config.server.http_workers)
        self.torch_threads = config.workers.torch_threads or max(1, share)
        super().__init__()

    def roll_devices(self, current: dict[int, Device], config: Config) -> dict[int, Device]:
        """Model worker slots for a config: one per GPU found through NVML, plus the CPU workers."""
        trace = config.gpu_trace
        if trace is not None:
            wanted_gpus = config.workers.gpus
            gpus = [g for g in TraceGpus(trace).gpus()
                    if wanted_gpus == "all" or (wanted_gpus != "none" and g.index in wanted_gpus)]
            log.info("GPUs simulated from %s: %s", trace, ", ".join(f"gpu{g.index}" for g in gpus) or "none")
        else:
            gpus, summary = discover(config.workers.gpus)
            log.info(summary)
        wanted = [Device("gpu", g.index) for g in gpus] + [Device("cpu")] * config.workers.cpu
        return plan_slots(current, wanted)

    def load_config(self) -> None:
        s = self.pconfig.server
        settings: dict[str, Any] = {
            "bind": [f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"],
            "workers": s.http_workers,
            "worker_class": "predictord.http.worker.HttpWorker",
            "preload_app": True,
            "graceful_timeout": int(s.graceful_timeout),
            "timeout": 30,
            "keepalive": s.keepalive,
            "loglevel": s.log_level,
            "errorlog": "-",
            "accesslog": None,
            "proc_name": "predictord",
            "control_socket_disable": True,
            "pre_fork": lambda arbiter, worker: arbiter.pre_fork_http(worker),
            "post_fork": lambda arbiter, worker: arbiter.post_fork_http(worker),
            "child_exit": lambda arbiter, worker: arbiter.http_worker_exited(worker),
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def front_settings(self) -> tuple[Any, ...]:
        """What the HTTP workers' front is made from (``load``): the [server] settings but the listen address (it
        takes a restart) and the number of workers (gunicorn adds or stops them), and the tokens' contents."""
        server = dataclasses.replace(self.pconfig.server, host="", port=0, http_workers=0)
        return server, self.pconfig.token("auth_token_file"), self.pconfig.token("admin_token_file")

    def load(self) -> Front:
        if not self.preloaded:
            preload(self.pconfig.workers.preload)
            self.preloaded = True
        s = self.pconfig.server
        tokens = Tokens(self.pconfig.token("auth_token_file"), self.pconfig.token("admin_token_file"))
        return Front(self.scoreboard, self.runtime, s.max_body_bytes, s.access_log,
                     Limits(s.max_header_bytes, s.read_timeout, openfiles.connections_for(openfiles.current())), tokens)


def serve(config: Config, reload: Callable[[], Config]) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    logs.setup(config.server.log_level, config.server.log_format)
    # gunicorn would say READY=1 before any model is loaded; the daemon speaks to systemd itself.
    notifier = Notifier.from_environment()
    log.info("config: %s; predictors: %s", config.path or "(defaults)", config.predictors_dir)
    before, now = openfiles.raise_to_hard()
    if now != before:
        log.info("open files: raised the limit from %d to %d (each client connection holds one)", before, now)
    if now < openfiles.ROOMY:
        log.warning("open files are limited to %d per process: each HTTP worker holds at most %d connections at once "
                    "and answers more with 503; raise the limit (systemd: LimitNOFILE=; a shell: ulimit -n)", now,
                    openfiles.connections_for(now))
    Master(PredictordApp(config, reload), notifier).run()
