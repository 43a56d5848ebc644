"""The master: gunicorn's Arbiter, extended to supervise model workers and the APIs they serve.

One decision loop (gunicorn's ``run``): signal handlers only enqueue; ``wait_for_signals`` also reads the model
workers' control channels and the probes' output; ``murder_workers`` enforces heartbeats and deadlines;
``manage_workers`` reconciles the desired state (HTTP workers, model workers per device, APIs per worker) and
publishes the routing table when anything changed. The master never imports predictor code and never touches CUDA.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil
from gunicorn import sock as gunicorn_sock
from gunicorn.arbiter import Arbiter

from .. import logs, metrics
from ..config import Config, ConfigError
from ..devices import Device
from ..scoreboard import MAX_HTTP, Scoreboard
from .balancer import Balancer
from .catalog import ApiRegistry
from .fleet import Fleet, ModelWorkerHandle, describe_exit, exit_cause
from .history import History, read_snapshot
from .notify import Notifier
from .records import ApiRecord
from .watcher import PredictorWatcher

log = logging.getLogger("predictord.master")
SAMPLE_EVERY = 5.0  # seconds between the samples behind status's recent figures
RSS_EVERY = 0.1  # seconds between looks at the model workers' RSS when [workers] max_rss_mib is set


def answers(path: Path) -> bool:
    """Whether a live process accepts connections on the Unix socket ``path`` (a stale one refuses them)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class Master(ApiRegistry, Balancer, Arbiter):  # type: ignore[misc]
    """gunicorn's Arbiter plus model workers, API records, probes and the routing table."""

    def __init__(self, app: Any, notifier: Notifier) -> None:
        self.notifier = notifier
        self.pconfig: Config = app.pconfig
        self.scoreboard: Scoreboard = app.scoreboard
        self.runtime: Path = app.runtime
        self.devices: dict[int, Device] = app.devices
        self.routes_path = self.runtime / "routes.json"
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.fleet = Fleet(self.scoreboard, self.runtime, app.torch_threads, self.model_worker_forked)
        self.apis: dict[str, ApiRecord] = {}
        self.probes: dict[str, tuple[subprocess.Popen[bytes], str, float, list[bytes]]] = {}
        self.respawn_at: dict[int, float] = {}
        self.stopping = False
        self.dirty = True
        self.started_at = time.time()
        self.watcher: PredictorWatcher | None = None
        self.exported: set[str] = set()  # APIs whose gauges were set
        self.history = History()
        self.next_sample = 0.0
        self.events: deque[dict[str, Any]] = deque(maxlen=50)  # recent loads, reloads, failures, restarts
        self.restarts: dict[int, int] = {}  # model worker slot -> unplanned exits
        self.init_balancer()
        super().__init__(app)
        for handler in self.log.error_log.handlers:
            logs.adopt(handler)  # gunicorn's own lines in the daemon's format

    # -- the loop ---------------------------------------------------------------------------------------------------
    def init_signals(self) -> None:
        super().init_signals()
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def wakeup(self) -> None:
        super().wakeup()
        try:
            os.write(self.wake_w, b"w")
        except BlockingIOError:
            pass

    def start(self) -> None:
        super().start()
        self.open_admin_socket()
        for listener in self.LISTENERS:
            log.info("predictord listening on %s (master pid %d)", listener, self.pid)
        self.start_watcher()  # before the scan: a file that lands between the two is seen by one of them
        self.start_sampler()
        self.sync_sources()
        self.publish()  # before any HTTP worker exists: a first request (socket activation) finds every API

    def open_admin_socket(self) -> None:
        """A Unix socket beside the TCP listener, for `predictord status`: the HTTP workers serve /admin/ only on
        it, so the admin surface is never on the network (also under socket activation, where gunicorn binds
        nothing itself)."""
        path = self.pconfig.admin_socket
        if answers(path):  # gunicorn would unlink it and bind anew: the other daemon's status would be gone
            log.warning("another predictord answers on its admin socket %s; this one has none (set [server] "
                        "admin_socket to a path of its own)", path)
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self.LISTENERS.append(gunicorn_sock.UnixSocket(str(path), self.cfg, self.log))
            log.info("admin socket: %s", path)
        except (OSError, ValueError) as e:
            log.warning("no admin socket at %s (%s); `predictord status` will not reach this daemon", path, e)

    def start_watcher(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        p = self.pconfig.predictors
        if p.watch and self.pconfig.predictors_dir.is_dir():
            self.watcher = PredictorWatcher(self.pconfig.predictors_dir, p.debounce, self.wakeup)
            self.watcher.start()
            log.info("watching %s for changes (debounce %.2gs)", self.pconfig.predictors_dir, p.debounce)

    def close_master_channels(self) -> None:
        """In a forked child: close the master's own channels (its wake-up pipe, control sockets, probes)."""
        signal.set_wakeup_fd(-1)
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        for handle in self.fleet.workers.values():
            handle.ctl.close()
        for proc, _, _, _ in self.probes.values():
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()

    def model_worker_forked(self) -> None:
        """In a forked model worker: it serves no HTTP, so it keeps neither the listeners nor the master's fds."""
        self.close_master_channels()
        for listener in self.LISTENERS:
            listener.close()
        for worker in self.WORKERS.values():
            worker.tmp.close()

    def wait_for_signals(self, timeout: float = 1.0) -> list[int]:
        """Sleep until a signal, a model worker's message, or a probe's output; handle the last two here."""
        handles = {h.ctl.fileno(): h for h in self.fleet.workers.values()}
        probes = {p.stdout.fileno(): name for name, (p, _, _, _) in self.probes.items() if p.stdout}
        due = self.watcher.next_due() if self.watcher else None
        rebalance_due = max(0.0, self.next_rebalance - time.monotonic())
        due = rebalance_due if due is None else min(due, rebalance_due)
        wait = 0.0 if not self.SIG_QUEUE.empty() else timeout if due is None else min(timeout, due)
        respawns = [t for slot, t in self.respawn_at.items() if slot in self.devices and slot not in self.fleet.workers]
        if respawns:  # a backed-off respawn is due before the next tick
            wait = min(wait, max(0.0, min(respawns) - time.monotonic()))
        if self.pconfig.workers.max_rss_mib:  # a leak overshoots the limit by what it grows between two looks
            wait = min(wait, RSS_EVERY)
        try:
            ready, _, _ = select.select([self.wake_r, *handles, *probes], [], [], wait)
        except InterruptedError:
            ready = []
        for fd in ready:
            if fd == self.wake_r:
                try:
                    while os.read(self.wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            elif fd in handles:
                for message in self.fleet.read(handles[fd]):
                    self.handle_model_message(handles[fd], message)
            elif fd in probes:
                self.read_probe(probes[fd])
        signals: list[int] = super().wait_for_signals(timeout=0)
        return signals

    def handle_term(self) -> None:
        """SIGTERM: stop accepting, let in-flight requests finish (graceful_timeout), exit 0."""
        self.notifier.stopping()
        log.info("SIGTERM: draining in-flight requests, then stopping")
        raise StopIteration

    def handle_int(self) -> None:
        """SIGINT (Ctrl-C in a terminal): the same graceful stop as SIGTERM."""
        self.notifier.stopping()
        log.info("SIGINT: draining in-flight requests, then stopping")
        raise StopIteration

    def handle_quit(self) -> None:
        """SIGQUIT: stop at once."""
        self.notifier.stopping()
        log.info("SIGQUIT: stopping at once; requests in flight are cut")
        self.stopping = True
        self.kill_workers(signal.SIGKILL)  # uvicorn would treat SIGQUIT as a graceful stop and wait for requests
        for handle in self.fleet.workers.values():
            handle.stopping = True
            self.fleet.kill(handle, signal.SIGKILL)
        self.stop(graceful=False)
        raise StopIteration

    def handle_hup(self) -> None:
        """SIGHUP: re-read config.toml, roll the workers it changes, and rescan the predictors directory."""
        self.notifier.reloading()
        log.info("SIGHUP: reloading %s and rescanning the predictors", self.pconfig.path or "(defaults)")
        try:
            new = self.app.reload_config()
        except ConfigError as e:
            log.error("SIGHUP: %s; keeping the running configuration", e)
            new = self.pconfig
        if new != self.pconfig:
            self.apply_config(new)
        self.sync_sources()

    def apply_config(self, new: Config) -> None:
        old, self.pconfig = self.pconfig, new
        if (old.server.host, old.server.port) != (new.server.host, new.server.port):
            log.warning("SIGHUP: a new listen address takes a restart; still listening on %s:%d",
                        old.server.host, old.server.port)
        if old.workers.preload != new.workers.preload:
            log.warning("SIGHUP: a new preload list takes a restart")
        logging.getLogger().setLevel(new.server.log_level.upper())
        self.num_workers = new.server.http_workers
        running = {h.slot: h.device for h in self.fleet.workers.values()}
        self.devices = self.app.roll_devices({**running, **self.devices}, new)
        self.forget_dropped_slots()
        self.start_sampler()
        if old.predictors != new.predictors or old.predictors_dir != new.predictors_dir:
            self.start_watcher()
        self.replace()

    def stop(self, graceful: bool = True) -> None:
        """HTTP workers first (they finish their requests, which need the model workers), then model workers."""
        self.stopping = True
        if self.watcher is not None:
            self.watcher.stop()
        super().stop(graceful)
        self.fleet.stop_all(self.pconfig.server.graceful_timeout if graceful else 1.0)
        for proc, _, _, _ in self.probes.values():
            proc.kill()
        shutil.rmtree(self.runtime, ignore_errors=True)

    # -- HTTP workers: a stable slot each, for their row in the scoreboard ---------------------------------------
    def pre_fork_http(self, worker: Any) -> None:
        used = {getattr(w, "slot", -1) for w in self.WORKERS.values()}
        worker.slot = min(set(range(MAX_HTTP)) - used)

    def post_fork_http(self, worker: Any) -> None:
        os.environ["PREDICTORD_HTTP_SLOT"] = str(worker.slot)
        logs.set_role(f"http{worker.slot}")
        self.close_master_channels()

    def http_worker_exited(self, worker: Any) -> None:
        self.scoreboard.clear_http(worker.slot)
        metrics.process_gone(worker.pid)
        if not self.stopping and len(self.WORKERS) < self.num_workers:  # not a planned scale-down
            metrics.get().restarts.labels("http", "exit").inc()

    # -- model workers ---------------------------------------------------------------------------------------------
    def reap_workers(self) -> None:
        for proc, _, _, _ in self.probes.values():
            proc.poll()  # reap our probes before gunicorn's waitpid(-1) takes their status
        for handle, status in self.fleet.reap():
            self.handle_model_exit(handle, status)
        super().reap_workers()

    def handle_model_exit(self, handle: ModelWorkerHandle, status: int | None) -> None:
        how = describe_exit(status)
        level = logging.INFO if handle.stopping or self.stopping else logging.ERROR
        log.log(level, "model worker %d (%s) pid %d %s", handle.slot, handle.device.label, handle.pid, how)
        for name, (version, _) in handle.loading.items():
            record = self.apis.get(name)
            if record is not None and record.version == version:
                record.fail({"message": f"the model worker died while loading it: it {how}",
                             "file": str(record.user_source.code), "line": None})
                log.error("API %s version %s failed: the model worker %s while loading it", name, version, how)
        if not self.stopping:
            # Back off only from a worker that died starting or loading (a crash loop); one that was serving comes
            # back at once, however often it is killed (OOM killer, max_rss_mib, a hang, an operator).
            serving = handle.up and not handle.loading
            self.respawn_at[handle.slot] = time.monotonic() + (0.0 if serving else self.fleet.backoff(handle.slot))
            if handle.kill_reason != "retired":
                cause = handle.kill_reason or exit_cause(status)
                metrics.get().restarts.labels("model", cause).inc()
                self.restarts[handle.slot] = self.restarts.get(handle.slot, 0) + 1
                self.event("restart", f"model worker {handle.slot} ({handle.device.label}) pid {handle.pid} {how}")
        metrics.process_gone(handle.pid)
        self.dirty = True

    def handle_model_message(self, handle: ModelWorkerHandle, m: dict[str, Any]) -> None:
        op = m["op"]
        if op == "started":
            handle.up = True
            log.info("model worker %d (%s) pid %d is up", handle.slot, handle.device.label, handle.pid)
        elif op == "loaded":
            self._loaded(handle, m)
        elif op == "unloaded":
            handle.loaded.pop(m["api"], None)
            handle.unloading.discard(m["api"])
        elif op == "hung":
            log.error("model worker %d (%s) pid %d: API %s predict() has run %.0fs (request %s); it will be "
                      "replaced when its heartbeat times out", handle.slot, handle.device.label, handle.pid,
                      m["api"], m["seconds"], m["request_id"])
        self.dirty = True

    def _loaded(self, handle: ModelWorkerHandle, m: dict[str, Any]) -> None:
        name, version = m["api"], m["version"]
        handle.loading.pop(name, None)
        record = self.apis.get(name)
        kind = "reload" if record is not None and (set(record.loaded_at) - {version}) else "load"
        metrics.get().loads.labels(name, kind, "ok" if m["ok"] else "failed").inc()
        if m["ok"]:
            metrics.get().load_seconds.labels(name).observe(m["seconds"])
            handle.loaded[name] = version
            if record is not None:
                record.loaded_at.setdefault(version, time.time())
                record.footprint = int(m.get("footprint", 0)) or record.footprint
                if version == record.version:
                    record.error = None  # the wanted version serves: older failures are history (in the log)
                    if record.settings is not None:
                        record.good = (version, record.source, record.settings)
            log.info("API %s version %s ready on model worker %d (%s)", name, version, handle.slot,
                     handle.device.label)
            self.event(kind, f"API {name} version {version} ready on {handle.device.label} (worker {handle.slot}) "
                             f"in {m['seconds']:.2f}s")
        elif record is not None:
            if version not in record.failed_versions:
                log.error("API %s version %s failed to load: %s", name, version, m["error"]["message"])
                self.event("failed", f"API {name} version {version} failed to load: {m['error']['message']}")
            record.fail(record.user_paths(m["error"]), version)

    def murder_workers(self) -> None:
        super().murder_workers()
        now_wall, now = time.time(), time.monotonic()
        limit = self.pconfig.workers.heartbeat_timeout
        for handle in list(self.fleet.workers.values()):
            silent = now_wall - self.scoreboard.last_beat(handle.slot)
            if silent > limit and not handle.stopping:
                log.error("model worker %d (%s) pid %d sent no heartbeat for %.0fs; killing it", handle.slot,
                          handle.device.label, handle.pid, silent)
                handle.stopping = True
                handle.kill_reason = "heartbeat"
                self.fleet.kill(handle, signal.SIGKILL)
            for name, (version, deadline) in list(handle.loading.items()):
                if now > deadline and name in self.apis:
                    timeout = self.pconfig.predictors.load_timeout
                    record = self.apis[name]
                    record.fail({"message": f"__init__ took longer than the load deadline ({timeout:g}s); raise "
                                            "[predictors] load_timeout if it is just slow",
                                 "file": str(record.user_source.code), "line": None}, version)
                    log.error("API %s version %s: __init__ exceeded %gs on model worker %d; killing the worker",
                              name, version, timeout, handle.slot)
                    handle.loading.pop(name)
                    handle.stopping = True
                    handle.kill_reason = "load_timeout"
                    self.fleet.kill(handle, signal.SIGKILL)
        self.murder_fat_workers()
        for name, (proc, _, deadline, _) in list(self.probes.items()):
            if now > deadline:
                proc.kill()
                timeout = self.pconfig.predictors.load_timeout
                self.finish_probe(name, {"ok": False, "error": {
                    "message": f"importing it took longer than the load deadline ({timeout:g}s)",
                    "file": str(self.apis[name].user_source.code) if name in self.apis else name, "line": None}})

    def murder_fat_workers(self) -> None:
        """[workers] max_rss_mib: a model worker whose resident memory passed it is killed and replaced."""
        limit = self.pconfig.workers.max_rss_mib
        for handle in list(self.fleet.workers.values()) if limit else []:
            try:
                rss = psutil.Process(handle.pid).memory_info().rss
            except psutil.Error:
                continue  # gone already: reaping will say why
            if rss > limit * 2**20 and not handle.stopping:
                log.error("model worker %d (%s) pid %d uses %d MiB, over [workers] max_rss_mib = %d; killing it "
                          "(APIs: %s)", handle.slot, handle.device.label, handle.pid, rss >> 20, limit,
                          ", ".join(sorted(handle.loaded)) or "none")
                handle.stopping = True
                handle.kill_reason = "memory"
                self.fleet.kill(handle, signal.SIGKILL)

    def manage_workers(self) -> None:
        super().manage_workers()
        if self.stopping:
            return
        self.notifier.watchdog()
        if time.monotonic() >= self.next_sample:
            self.next_sample = time.monotonic() + SAMPLE_EVERY
            self.history.add(read_snapshot())
            self.prune_snapshots()
            self.dirty = True
        if self.watcher is not None:
            changed = self.watcher.step()
            if changed:
                self.sync_sources(only=changed)
        self.rebalance_tick()
        now = time.monotonic()
        for slot, device in self.devices.items():
            if slot not in self.fleet.workers and now >= self.respawn_at.get(slot, 0.0):
                self.fleet.spawn(slot, device)
                self.dirty = True
        for handle in list(self.fleet.workers.values()):
            if handle.slot not in self.devices:
                self._retire_when_replaced(handle)
            elif handle.up and not handle.stopping:
                self._reconcile_worker(handle)
        if self.dirty:
            self.publish()

    def _served_elsewhere(self, name: str, handle: ModelWorkerHandle) -> bool:
        """Another worker that placement wants for this API has it loaded (make before break)."""
        record = self.apis.get(name)
        return record is None or any(
            name in h.loaded and h.slot in record.placement and not h.stopping
            for h in self.fleet.workers.values() if h is not handle)

    def _retire_when_replaced(self, handle: ModelWorkerHandle) -> None:
        """A worker whose slot is no longer wanted keeps serving until its APIs are ready elsewhere, then drains."""
        if handle.stopping or not all(self._served_elsewhere(n, handle) for n in handle.loaded):
            return
        log.info("retiring model worker %d (%s) pid %d: its slot is no longer configured", handle.slot,
                 handle.device.label, handle.pid)
        handle.stopping = True
        handle.kill_reason = "retired"
        self.publish()  # out of the routes first, then drain what it holds
        self.fleet.kill(handle, signal.SIGTERM)

    def _reconcile_worker(self, handle: ModelWorkerHandle) -> None:
        """Send the loads and unloads that make this worker serve what placement wants of it."""
        for name, record in self.apis.items():
            target = record.target()
            if target is None or handle.slot not in record.placement:
                continue
            if handle.loading:
                break  # one load at a time per worker, so a hanging __init__ is blamed on the right API
            version, source, settings = target
            if handle.loaded.get(name) != version:
                others = [h for h in self.fleet.workers.values() if h is not handle]
                if any(name in h.loading for h in others) and any(name in h.loaded for h in others + [handle]):
                    continue  # rolling a new version: one replica at a time while an old one serves
                serving = settings.serving
                message = {"op": "load", "source": source, "version": version, "config": dict(settings.config),
                           "serving": dataclasses.asdict(serving), "slot": record.slot}
                if handle.send(message):
                    deadline = time.monotonic() + self.pconfig.predictors.load_timeout
                    handle.loading[name] = (version, deadline)
                    handle.threads[name] = serving.threads * serving.max_batch_size  # jobs it runs at once
                    log.info("loading API %s version %s on model worker %d (%s)%s", name, version, handle.slot,
                             handle.device.label, "" if version == record.version else ", the last good version")
        for name in list(handle.loaded):
            kept = self.apis.get(name)
            unwanted = kept is None or handle.slot not in kept.placement
            if unwanted and name not in handle.unloading and self._served_elsewhere(name, handle):
                if handle.send({"op": "unload", "api": name}):
                    handle.unloading.add(name)
                    log.info("unloading API %s from model worker %d (%s)", name, handle.slot, handle.device.label)
