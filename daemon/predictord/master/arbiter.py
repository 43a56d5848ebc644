"""The master: gunicorn's Arbiter, extended to supervise model workers and the APIs they serve.

One decision loop (gunicorn's ``run``): signal handlers only enqueue; ``wait_for_signals`` also reads the model
workers' control channels and the probes' output; each tick then calls its parts in a fixed order (see
``manage_workers``): the reader's findings, the catalog, the balancer, placement, the pure ``reconcile`` and the
publisher. The master never imports predictor code and never touches CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gunicorn import sock as gunicorn_sock
from gunicorn.arbiter import Arbiter

from .. import bodies, logs, metrics, reaping
from ..config import Config
from ..protocol import Control, Failed, Health, Hung, Loaded
from ..scoreboard import MAX_HTTP
from . import sighup
from .autopsy import Autopsy
from .balancer import Balancer
from .catalog import Catalog
from .fleet import Fleet, ModelWorkerHandle
from .notify import Notifier
from .publisher import DaemonInfo, Publisher
from .reader import DirectoryReader
from .reconcile import Action, Retire, reconcile
from .records import Events

log = logging.getLogger("predictord.master")
RSS_EVERY = 0.1  # seconds between looks at the model workers' RSS when [workers] max_rss_mib is set
FIRST_READ_WAIT = 10.0  # seconds the start waits for the first reading of the predictors directory
SLOW_READ = 10.0  # seconds a reading may take before the log says the directory is stuck
PRUNE_EVERY = 5.0  # seconds between prunings of old versions' code copies


def answers(path: Path) -> bool:
    """Whether a live process accepts connections on the Unix socket ``path`` (a stale one refuses them)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class Master(Arbiter):  # type: ignore[misc]
    """gunicorn's Arbiter plus the parts that run the APIs: catalog, fleet, balancer, publisher."""

    def __init__(self, app: Any, notifier: Notifier) -> None:
        self.notifier = notifier
        self.pconfig: Config = app.pconfig
        self.runtime = app.runtime
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.events = Events()
        self.catalog = Catalog(self.pconfig, self.runtime, self.events)
        self.fleet = Fleet(app.scoreboard, self.runtime, app.torch_threads, self.model_worker_forked,
                           self.pconfig.server.graceful_timeout)
        self.balancer = Balancer(self.pconfig, app.devices, self.catalog, self.fleet, app.scoreboard, self.events)
        self.publisher = Publisher(self.runtime, app.scoreboard, notifier)
        self.stopping = False
        self.drain_until: float | None = None  # monotonic end of [server] drain_delay, from SIGTERM on
        self.started_at = time.time()
        self.next_prune = 0.0
        self.faults = set(filter(None, os.environ.pop("PREDICTORD_TEST_FAULTS", "").split(",")))
        gate = os.environ.pop("PREDICTORD_TEST_READ_GATE", "")  # a test's hung mount: see DirectoryReader.gate
        self.read_gate = Path(gate) if gate else None
        self.reader = self.new_reader()
        self.slow_read_said = False
        self.shm_lock: int | None = None
        self.read_from: Path | None = None  # the directory of the readings applied (a link's target then)
        super().__init__(app)
        self.front_made = app.front_settings()  # what the HTTP workers' front was made from (refresh_front)
        self.roll_pending = False  # new HTTP workers to start once the last roll's old ones are gone
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
        if not reaping.become_subreaper():
            log.warning("not a child subreaper: processes a predictor starts may outlive it")
        super().start()
        self.shm_lock = bodies.hold(self.pid)  # before any worker makes a file: they inherit it
        self.open_admin_socket()
        for listener in self.LISTENERS:
            log.info("predictord listening on %s (master pid %d)", listener, self.pid)
        self.balancer.start_sampler()
        self.start_reader()
        if not self.reader.wait_first(FIRST_READ_WAIT):
            log.warning("the predictors directory %s has not been read in %gs; serving starts without it",
                        self.reader.directory, FIRST_READ_WAIT)
        self.take_readings()
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

    def new_reader(self) -> DirectoryReader:
        p = self.pconfig.predictors
        return DirectoryReader(self.pconfig.predictors_dir, self.runtime, p.check_permissions, self.wakeup,
                               self.read_gate)

    def start_reader(self) -> None:
        """The reader thread watches and reads the directory (started watching before its first reading: a file
        that lands between the two is seen by one of them)."""
        p = self.pconfig.predictors
        self.reader.start(p.watch, p.debounce)
        self.reader.request(None)

    def take_readings(self) -> None:
        """Apply what the reader found; say once when a reading is stuck (a hung mount: serving goes on)."""
        for reading in self.reader.take():
            if reading.directory != self.read_from:
                if self.read_from is not None:
                    self.events.add("directory", f"the predictors directory is now {reading.directory}")
                self.read_from = reading.directory
            self.catalog.apply(reading)
        busy = self.reader.busy_for(time.monotonic())
        if busy > SLOW_READ and not self.slow_read_said:
            log.error("reading the predictors directory %s has taken %.0fs (a hung mount?); the APIs keep serving "
                      "what they have, and changes load once it answers", self.reader.directory, busy)
            self.slow_read_said = True
        elif busy == 0.0:
            self.slow_read_said = False

    def close_master_channels(self) -> None:
        """In a forked child: close the master's own channels (its wake-up pipe, control sockets, probes)."""
        signal.set_wakeup_fd(-1)
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        for handle in self.fleet:
            handle.ctl.close()
        for p in self.catalog.probes.values():
            for stream in (p.process.stdout, p.process.stderr):
                if stream:
                    stream.close()
        for build in self.catalog.envs.builds.values():
            if build.process is not None and build.process.stdout is not None:
                build.process.stdout.close()

    def model_worker_forked(self) -> None:
        """In a forked model worker: it serves no HTTP, so it keeps neither the listeners nor the master's fds."""
        self.close_master_channels()
        for listener in self.LISTENERS:
            listener.close()
        for worker in self.WORKERS.values():
            worker.tmp.close()

    def wait_for_signals(self, timeout: float = 1.0) -> list[int]:
        """Sleep until a signal, a model worker's message, or a probe's output; handle the last two here."""
        handles = {h.ctl.fileno(): h for h in self.fleet}
        probes = self.catalog.probe_fds()
        builds = self.catalog.envs.fds()
        now = time.monotonic()
        waits = [timeout, self.balancer.due_in(now)]
        if (respawn := self.fleet.next_respawn(self.balancer.devices)) is not None:
            waits.append(max(0.0, respawn - now))  # a backed-off respawn is due before the next tick
        if self.pconfig.workers.max_rss_mib:  # a leak overshoots the limit by what it grows between two looks
            waits.append(RSS_EVERY)
        wait = 0.0 if not self.SIG_QUEUE.empty() else min(waits)
        try:
            ready, _, _ = select.select([self.wake_r, *handles, *probes, *builds], [], [], wait)
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
                with self.step("model worker messages"):
                    for message in self.fleet.read(handles[fd]):
                        self.on_model_message(handles[fd], message)
            elif fd in probes:
                with self.step("probes"):
                    self.catalog.read_probe(probes[fd])
            elif fd in builds:
                with self.step("environments"):
                    self.catalog.envs.read(builds[fd])
        signals: list[int] = super().wait_for_signals(timeout=0)
        return signals

    def on_model_message(self, handle: ModelWorkerHandle, m: Control) -> None:
        self.fleet.note(handle, m)
        if isinstance(m, Loaded):
            self.catalog.loaded(m, handle.slot, handle.device.label)
        elif isinstance(m, Failed):
            self.catalog.request_failed(m)
        elif isinstance(m, Health):
            self.catalog.health(m, handle.slot)
        elif isinstance(m, Hung):
            blame = Autopsy(m.api, f"hung in predict() for {m.seconds:.0f}s (request {m.request_id})")
            self.catalog.crashed(blame, handle.slot, self.balancer.kind_of(m.api) == "cpu")
            if handle.device.kind == "cpu" and not handle.stopping:  # a GPU worker stops beating instead
                self.balancer.recycle(handle.slot, f"API {m.api}'s predict() hung")

    # -- signals ---------------------------------------------------------------------------------------------------
    def handle_term(self) -> None:
        """SIGTERM: stop accepting, let in-flight requests finish (graceful_timeout), exit 0. With [server]
        drain_delay, first that many seconds of /readyz 503 while requests are still served (a second SIGTERM
        ends the delay)."""
        self._graceful_stop("SIGTERM")

    def handle_int(self) -> None:
        """SIGINT (Ctrl-C in a terminal): the same graceful stop as SIGTERM."""
        self._graceful_stop("SIGINT")

    def _graceful_stop(self, signal_name: str) -> None:
        self.notifier.stopping()
        delay = self.pconfig.server.drain_delay
        if delay > 0 and self.drain_until is None:
            self.drain_until = time.monotonic() + delay
            self.fleet.scoreboard.set_draining()
            log.info("%s: /readyz answers 503 for %gs ([server] drain_delay) while requests are still served, "
                     "then draining in-flight requests and stopping", signal_name, delay)
            return
        log.info("%s: draining in-flight requests, then stopping", signal_name)
        raise StopIteration

    def handle_quit(self) -> None:
        """SIGQUIT: stop at once."""
        self.notifier.stopping()
        log.info("SIGQUIT: stopping at once; requests in flight are cut")
        self.stopping = True
        self.kill_workers(signal.SIGKILL)  # uvicorn would treat SIGQUIT as a graceful stop and wait for requests
        for handle in self.fleet:
            handle.stopping = True
            self.fleet.kill(handle, signal.SIGKILL)
        self.stop(graceful=False)
        raise StopIteration

    def handle_hup(self) -> None:
        """SIGHUP: re-read config.toml, apply what changed (sighup.py), and rescan the predictors directory."""
        sighup.reload(self)

    def stop(self, graceful: bool = True) -> None:
        """HTTP workers first (they finish their requests, which need the model workers), then model workers."""
        self.stopping = True
        self.reader.stop()
        super().stop(graceful)
        self.fleet.stop_all(self.pconfig.server.graceful_timeout if graceful else 1.0)
        for p in self.catalog.probes.values():
            p.process.kill()
        self.catalog.envs.stop()
        reaping.reap_strays(())  # whatever is left under the master now is a predictor's: it ends with the daemon
        bodies.remove_left(self.pid)
        bodies.let_go(self.pid, self.shm_lock)
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
        self.fleet.scoreboard.clear_http(worker.slot)
        bodies.remove_left(self.pid, worker.slot)  # the shared bodies of the requests it held
        metrics.process_gone(worker.pid)
        if not self.stopping and len(self.WORKERS) < self.num_workers:  # not a planned scale-down
            metrics.get().restarts.labels("http", "exit").inc()

    # -- model workers ---------------------------------------------------------------------------------------------
    def reap_workers(self) -> None:
        with self.step("reaping"):
            self.reap_model_workers()
        super().reap_workers()

    def reap_model_workers(self) -> None:
        for p in self.catalog.probes.values():
            p.process.poll()  # reap our probes (and builders) before gunicorn's waitpid(-1) takes their status
        for build in self.catalog.envs.builds.values():
            if build.process is not None:
                build.process.poll()
        for handle, status in self.fleet.reap():
            autopsy = self.fleet.examine(handle, status, self.catalog.names(), self.catalog.api_of_file)
            how = self.fleet.exited(handle, status, self.stopping, autopsy)
            for name, (version, _) in handle.loading.items():
                self.catalog.load_failed(name, version, f"the model worker died while loading it: it {how}")
                log.error("API %s version %s failed: the model worker %s while loading it", name, version, how)
            if not self.stopping and handle.kill_reason == "retired":
                self.events.add("retire", f"model worker {handle.slot} ({handle.device.label}) pid {handle.pid} "
                                          f"retired: {handle.kill_detail}")
            elif not self.stopping:
                self.events.add("restart", f"model worker {handle.slot} ({handle.device.label}) pid {handle.pid} "
                                           f"{how}")
                if autopsy.culprit is not None and autopsy.culprit not in handle.loading:
                    self.catalog.crashed(autopsy, handle.slot, self.balancer.kind_of(autopsy.culprit) == "cpu")

    def murder_workers(self) -> None:
        super().murder_workers()
        now = time.monotonic()
        with self.step("policing model workers"):
            self.fleet.murder_silent(self.pconfig.workers.heartbeat_timeout)
            self.fleet.murder_fat(self.pconfig.workers.max_rss_mib)
            self.fleet.murder_late(now)
            for handle, over in self.fleet.grown(self.pconfig.workers.recycle_mib, now):
                self.balancer.recycle(handle.slot, f"its memory is {over >> 20} MiB over what it started with and "
                                                   f"its APIs' loads measured ([workers] recycle_mib = "
                                                   f"{self.pconfig.workers.recycle_mib})")
        with self.step("probes"):
            self.catalog.expire_probes(now)

    def manage_workers(self) -> None:
        """Each tick, in this order: the HTTP workers (gunicorn), the directory, the balancer, placement, the model
        workers (spawn, then reconcile), old code copies and stray processes, and what changed is published. Each
        step is guarded: nothing a worker or the filesystem does may end the loop (a step that raises is logged,
        and the tick goes on)."""
        super().manage_workers()
        if self.stopping:
            return
        sighup.roll_http(self)
        if self.drain_until is not None and time.monotonic() >= self.drain_until:
            log.info("drain_delay over: draining in-flight requests, then stopping")
            raise StopIteration
        self.fleet.scoreboard.beat_master()
        self.notifier.watchdog()
        now = time.monotonic()
        sampled = False
        with self.step("history"):
            sampled = self.publisher.sample_due(now, self.catalog)
        with self.step("directory"):
            self.take_readings()
        with self.step("environments"):
            self.catalog.envs.expire(now)
            self.catalog.env_done()
        with self.step("balancer"):
            self.balancer.tick(now)
        with self.step("placement"):
            if self.catalog.needs_plan:
                self.catalog.plan(self.balancer.slots(), self.balancer.gpu_room())
        with self.step("spawning"):
            self.fleet.spawn_missing(self.balancer.devices, now)
        with self.step("reconcile"):
            views = [h.view(h.slot in self.balancer.devices) for h in self.fleet]
            for action in reconcile(self.catalog.wanted(), views, now):
                self.execute(action)
        if now >= self.next_prune:
            self.next_prune = now + PRUNE_EVERY
            with self.step("pruning"):
                self.catalog.prune_snapshots(self.fleet.in_use())
                running = {Path(h.device.env).name for h in self.fleet if h.device.env}
                self.catalog.envs.prune(self.catalog.envs_in_use() | running, now)
                self.reap_strays()
                for master, count in bodies.sweep_dead().items():
                    log.info("removed %d files a killed predictord (master pid %d) left in %s", count, master,
                             bodies.ROOT)
        if sampled or self.catalog.changed or self.fleet.changed or self.balancer.changed or self.events.changed:
            with self.step("publishing"):
                self.publish()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """One guarded step of the loop: an exception is logged with its traceback, and the loop goes on."""
        try:
            yield
            if name in self.faults:  # a test's injected fault (PREDICTORD_TEST_FAULTS), once per step
                self.faults.discard(name)
                raise RuntimeError(f"a fault injected into the {name} step")
        except (StopIteration, KeyboardInterrupt):
            raise
        except Exception:  # noqa: BLE001 - the loop outlives any one step
            log.exception("the master's %s step failed; the loop goes on", name)

    def reap_strays(self) -> None:
        """End the processes that reached the master (a subreaper) without being its own: what a predictor
        started, left by a worker or probe that died."""
        known = {*self.WORKERS, *(h.pid for h in self.fleet), *(p.process.pid for p in self.catalog.probes.values()),
                 *(b.process.pid for b in self.catalog.envs.builds.values() if b.process is not None)}
        reaping.reap_strays(known)

    def execute(self, action: Action) -> None:
        """Carry out one of reconcile's actions (a retirement publishes first: out of the routes, then drain)."""
        if not isinstance(action, Retire):
            self.fleet.carry_out(action, self.catalog, self.pconfig.predictors.load_timeout)
            return
        handle = self.fleet.workers[action.worker]
        why = self.balancer.gone_why(handle.slot)
        log.info("retiring model worker %d (%s) pid %d: %s", handle.slot, handle.device.label, handle.pid, why)
        handle.stopping, handle.kill_reason, handle.kill_detail = True, "retired", why
        self.publish()
        self.fleet.kill(handle, signal.SIGTERM, "retired", why)

    def publish(self) -> None:
        info = DaemonInfo(self.pid, self.started_at, str(self.read_from or self.reader.directory), len(self.WORKERS),
                          round(self.reader.busy_for(time.monotonic()), 1))
        self.publisher.publish(self.catalog, self.fleet, self.balancer, self.events, info)
        self.catalog.changed = self.fleet.changed = self.balancer.changed = self.events.changed = False
