"""The model worker processes as the master sees them: spawning, control messages, exits, deadlines and the
restarts that follow."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .. import bodies, envs, logs, metrics
from ..devices import Device
from ..model.process import crash_files
from ..model.worker import ModelWorker
from ..protocol import (
    CONTROL,
    KILL_CAUSES,
    KILL_CODES,
    Control,
    FrameReader,
    Health,
    Hung,
    Load,
    Loaded,
    Problem,
    Started,
    Unload,
    Unloaded,
    control,
)
from ..scoreboard import RUN_ROWS, Scoreboard
from .autopsy import Autopsy, examine
from .catalog import Catalog
from .reconcile import KillForDeadline, LoadApi, UnloadApi, WorkerView
from .records import Replica

log = logging.getLogger("predictord.master")

EXIT_CODES = {0: "exited cleanly", 1: "crashed (see its traceback above)"}
MAX_BACKOFF = 10.0
BACKOFF_WINDOW = 60.0  # seconds: deaths of a slot within this back off its respawn
WEIGH_AFTER = 5.0  # seconds after an unload before a worker's memory is weighed (its garbage is collected by then)


def describe_exit(status: int | None, guess: bool = True) -> str:
    """An exit status in words, naming the likely cause (``guess``: when nothing better is known)."""
    if status is None:
        return "exited (status unknown)"
    if os.WIFSIGNALED(status):
        name = exit_cause(status)
        if os.WTERMSIG(status) == signal.SIGKILL and guess:
            return f"was killed by {name} (the OOM killer, or an operator)"
        return f"was killed by {name}"
    code = os.WEXITSTATUS(status)
    hint = " (did a predictor call exit or os._exit?)" if guess else ""
    return EXIT_CODES.get(code, f"exited with status {code}{hint}")


def exit_cause(status: int | None) -> str:
    """A short label for an exit status, for metrics: SIGKILL, exit 3, unknown."""
    if status is None:
        return "unknown"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return signal.Signals(sig).name if sig in signal.Signals.__members__.values() else f"signal {sig}"
    return f"exit {os.WEXITSTATUS(status)}"


@dataclass
class ModelWorkerHandle:
    """A running model worker: its process, its control channel, and what it has loaded."""

    slot: int
    device: Device
    pid: int
    ctl: socket.socket
    socket_path: str
    spawned_at: float
    row: int = 0  # its process's row of job marks in the scoreboard
    started_at: float = field(default_factory=time.time)  # wall clock, for uptime in status
    up: bool = False  # it has said Started
    stopping: bool = False
    kill_reason: str = ""  # why the master ended it: heartbeat, load_timeout, memory, retired
    kill_detail: str = ""  # the specifics, in words (which API, which figures)
    kill_by: float = 0.0  # monotonic: a worker asked to stop is SIGKILLed past this ([server] graceful_timeout)
    hung: str | None = None  # the API whose predict() it said hung
    base_rss: int = 0  # resident bytes when it started, before any load
    rss: dict[str, int] = field(default_factory=dict)  # API -> resident bytes its load added
    weigh_at: float = 0.0  # monotonic: when to compare its memory with what its APIs explain (after an unload)
    loaded: dict[str, str] = field(default_factory=dict)  # API -> version serving
    loading: dict[str, tuple[str, float]] = field(default_factory=dict)  # API -> (version, deadline)
    unloading: set[str] = field(default_factory=set)
    threads: dict[str, int] = field(default_factory=dict)  # API -> jobs it runs at once
    lanes: dict[str, int] = field(default_factory=dict)  # API -> predict() calls it runs at once
    unhealthy: dict[str, Problem] = field(default_factory=dict)  # API -> why its health() fails here (not routed)
    inbox: list[Control] = field(default_factory=list)  # control messages read, not yet handled

    def __post_init__(self) -> None:
        self.reader = FrameReader(self._frame)

    def _frame(self, kind: int, job_id: int, payload: memoryview) -> None:
        if kind == CONTROL:
            self.inbox.append(pickle.loads(payload))

    def send(self, message: Control) -> bool:
        try:
            self.ctl.sendall(control(message))
            return True
        except OSError:
            return False

    def view(self, configured: bool) -> WorkerView:
        return WorkerView(self.slot, configured, self.up, self.stopping, dict(self.loaded), dict(self.loading),
                          frozenset(self.unloading))


class Fleet:
    """Spawns model workers in their slots, reads what they say, and reaps and replaces them."""

    def __init__(self, scoreboard: Scoreboard, runtime: Path, torch_threads: int,
                 close_in_child: Callable[[], None], graceful: float = 30.0) -> None:
        self.scoreboard = scoreboard
        self.graceful = graceful  # [server] graceful_timeout
        self.runtime = runtime
        self.torch_threads = torch_threads
        self.close_in_child = close_in_child
        self.workers: dict[int, ModelWorkerHandle] = {}
        self.generation = 0
        self.deaths: dict[int, list[float]] = {}  # slot -> recent death times, for back-off
        self.respawn_at: dict[int, float] = {}  # slot -> monotonic time it may be spawned again
        self.restarts: dict[int, int] = {}  # slot -> unplanned exits
        self.changed = True

    def __iter__(self) -> Iterator[ModelWorkerHandle]:
        return iter(list(self.workers.values()))

    # -- processes -------------------------------------------------------------------------------------------------
    def spawn(self, slot: int, device: Device) -> ModelWorkerHandle:
        """Fork a model worker into ``slot``; it reports Started on its control channel when it listens."""
        self.generation += 1
        path = str(self.runtime / f"model-{slot}-{self.generation}.sock")
        row = self.generation % RUN_ROWS  # a fresh row: the last process in this slot may still be examined
        self.scoreboard.clear_run(row)
        for leftover in crash_files(self.runtime, row):
            leftover.unlink(missing_ok=True)
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: drop the master's channels and signal handling, then become a model worker
            ours.close()
            self.close_in_child()
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                        signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH):
                signal.signal(sig, signal.SIG_DFL)
            if device.fresh:
                self.exec_fresh(slot, device, theirs, path, row)
            ModelWorker(slot, device, theirs, self.scoreboard, path, self.torch_threads, row).run()
        theirs.close()
        ours.setblocking(True)
        handle = ModelWorkerHandle(slot, device, pid, ours, path, time.monotonic(), row)
        self.workers[slot] = handle
        self.scoreboard.beat(slot)
        self.changed = True
        log.info("spawned model worker %d (%s) pid %d", slot, device.label, pid)
        return handle

    def exec_fresh(self, slot: int, device: Device, ctl: socket.socket, path: str, row: int) -> None:
        """In the forked child: become a model worker in a fresh interpreter of its environment's Python (see
        model/main.py), keeping only the control socket and the scoreboard open; never returns."""
        board = self.scoreboard
        spec = {"slot": slot, "device": dataclasses.asdict(device), "socket": path, "threads": self.torch_threads,
                "row": row, "apis": board.apis, "board_fd": board.fd, "http_slots": board.http_slots,
                "ctl_fd": ctl.fileno(), "log_level": logging.getLevelName(logging.getLogger().level).lower(),
                "log_format": logs.current_format()}
        try:
            os.set_inheritable(board.fd, True)
            os.set_inheritable(ctl.fileno(), True)
            env = Path(device.env)
            os.execve(envs.python_of(env), [str(envs.python_of(env)), "-s", "-m", "predictord.model.main",
                                            json.dumps(spec)], envs.child_environ(env))
        except OSError as e:
            log.error("model worker %d: cannot start %s (%s)", slot, envs.python_of(Path(device.env)), e)
        os._exit(1)

    def spawn_missing(self, devices: Mapping[int, Device], now: float) -> None:
        """A worker for every wanted slot that has none, once its back-off (if any) has passed."""
        for slot, device in devices.items():
            if slot not in self.workers and now >= self.respawn_at.get(slot, 0.0):
                self.spawn(slot, device)

    def next_respawn(self, devices: Mapping[int, Device]) -> float | None:
        """When the earliest backed-off respawn is due (monotonic), if one is waiting."""
        due = [t for slot, t in self.respawn_at.items() if slot in devices and slot not in self.workers]
        return min(due) if due else None

    def read(self, handle: ModelWorkerHandle) -> list[Control]:
        """Messages waiting on a worker's control channel ([] and EOF look alike; reaping tells them apart)."""
        try:
            data = handle.ctl.recv(65536, socket.MSG_DONTWAIT)
        except OSError:  # nothing waiting (BlockingIOError) or the worker is gone
            data = b""
        if data:
            handle.reader.feed(data)
        messages, handle.inbox = handle.inbox, []
        return messages

    def note(self, handle: ModelWorkerHandle, m: Control) -> None:
        """What a worker's message changes about the worker itself (the catalog hears about the APIs)."""
        self.changed = True
        if isinstance(m, Started):
            handle.up, handle.base_rss = True, m.rss
            log.info("model worker %d (%s) pid %d is up", handle.slot, handle.device.label, handle.pid)
        elif isinstance(m, Health):
            if m.ok:
                handle.unhealthy.pop(m.api, None)
            elif m.problem is not None:
                handle.unhealthy[m.api] = m.problem
        elif isinstance(m, Loaded):
            handle.loading.pop(m.api, None)
            handle.unhealthy.pop(m.api, None)  # a new instance: healthy until its health() says otherwise
            if m.ok:
                if m.api in handle.loaded:  # a reload: the old version goes now
                    handle.weigh_at = time.monotonic() + WEIGH_AFTER
                handle.loaded[m.api] = m.version
                handle.rss[m.api] = m.rss
            else:  # a failed load may have kept itself alive too (a thread it started holds it)
                handle.weigh_at = time.monotonic() + WEIGH_AFTER
        elif isinstance(m, Unloaded):
            handle.loaded.pop(m.api, None)
            handle.unhealthy.pop(m.api, None)
            handle.rss.pop(m.api, None)
            handle.unloading.discard(m.api)
            handle.weigh_at = time.monotonic() + WEIGH_AFTER
        elif isinstance(m, Hung):
            handle.hung = m.api
            then = ("its APIs move to a new worker" if handle.device.kind == "cpu"
                    else "it will be replaced when its heartbeat times out")
            log.error("model worker %d (%s) pid %d: API %s predict() has run %.0fs (request %s); %s", handle.slot,
                      handle.device.label, handle.pid, m.api, m.seconds, m.request_id, then)

    def backoff(self, slot: int) -> float:
        """Seconds to wait before respawning a slot that keeps dying: 0 for its first death in a minute, then 0.25 s,
        doubling to at most MAX_BACKOFF, so a crash loop costs little CPU."""
        now = time.monotonic()
        recent = [t for t in self.deaths.get(slot, []) if now - t < BACKOFF_WINDOW] + [now]
        self.deaths[slot] = recent
        return 0.0 if len(recent) <= 1 else min(MAX_BACKOFF, 0.25 * 2 ** (len(recent) - 2))

    def examine(self, handle: ModelWorkerHandle, status: int | None, names: Mapping[int, str],
                api_of: Callable[[str], str | None]) -> Autopsy:
        """Whose code ended a dead worker, from what it left behind."""
        hung = handle.hung if handle.kill_reason == "heartbeat" else None
        return examine(self.scoreboard, handle.row, status, crash_files(self.runtime, handle.row), names, api_of,
                       hung)

    def reap(self) -> list[tuple[ModelWorkerHandle, int | None]]:
        """Model workers that have exited, with their wait status (None when another waitpid got it first)."""
        gone = []
        for slot, handle in list(self.workers.items()):
            status: int | None
            try:
                pid, status = os.waitpid(handle.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = handle.pid, None
            if pid:
                del self.workers[slot]
                handle.ctl.close()
                bodies.remove_left(os.getpid(), bodies.answers_of(handle.pid))  # the large answers it had lent
                try:
                    os.unlink(handle.socket_path)
                except OSError:
                    pass
                gone.append((handle, status))
        return gone

    def exited(self, handle: ModelWorkerHandle, status: int | None, stopping: bool, autopsy: Autopsy) -> str:
        """Log a worker's exit with whose code ended it, count it, and plan its respawn (backed off when the slot
        keeps dying); returns what happened, in words."""
        if handle.kill_reason in KILL_CAUSES:
            how = f"was killed by the daemon: {KILL_CAUSES[handle.kill_reason]}"
            how += f" ({handle.kill_detail})" if handle.kill_detail else ""
        else:
            how = describe_exit(status, guess=autopsy.culprit is None)
        blame = autopsy.text() if handle.kill_reason != "retired" else ""
        how += f": {blame}" if blame else ""
        level = logging.INFO if handle.stopping and handle.kill_reason in ("", "retired") or stopping else logging.ERROR
        log.log(level, "model worker %d (%s) pid %d %s", handle.slot, handle.device.label, handle.pid, how)
        if not stopping:
            planned = handle.kill_reason == "retired"
            # Back off from a crash loop: a worker that died starting or loading, or whose code ended it. One that
            # was serving and got SIGKILL from outside (the OOM killer, an operator, max_rss_mib) comes back at once.
            serving = handle.up and not handle.loading
            sigkill = status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            crash = autopsy.culprit is not None or not sigkill
            wait = self.backoff(handle.slot) if not planned and (crash or not serving) else 0.0
            self.respawn_at[handle.slot] = time.monotonic() + wait
            if not planned:
                metrics.get().restarts.labels("model", handle.kill_reason or exit_cause(status)).inc()
                self.restarts[handle.slot] = self.restarts.get(handle.slot, 0) + 1
        metrics.process_gone(handle.pid)
        self.changed = True
        return how

    def kill(self, handle: ModelWorkerHandle, sig: int, reason: str = "", detail: str = "") -> None:
        """Signal a worker; with a ``reason`` (heartbeat, load_timeout, memory, retired) it is one we end, and the
        scoreboard says so before it dies (the HTTP workers tell its requests why)."""
        if reason:
            handle.stopping = True
            handle.kill_reason, handle.kill_detail = reason, detail
            handle.kill_by = handle.kill_by or time.monotonic() + self.graceful
            self.scoreboard.set_killed(handle.row, KILL_CODES.get(reason, 0))
            self.changed = True
        try:
            os.kill(handle.pid, sig)
        except ProcessLookupError:
            pass

    # -- policing --------------------------------------------------------------------------------------------------
    def murder_late(self, now: float) -> None:
        """A worker asked to stop (retired, recycled) that has not in [server] graceful_timeout is SIGKILLed: a
        predict() that never returns would keep it for ever."""
        for handle in self:
            if handle.stopping and handle.kill_by and now > handle.kill_by:
                log.error("model worker %d (%s) pid %d did not stop within [server] graceful_timeout (%gs); killing "
                          "it", handle.slot, handle.device.label, handle.pid, self.graceful)
                handle.kill_by = 0.0
                self.kill(handle, signal.SIGKILL)

    def grown(self, limit_mib: int, now: float) -> list[tuple[ModelWorkerHandle, int]]:
        """[workers] recycle_mib: workers whose memory, weighed a moment after an unload, a reload or a failed load,
        exceeds what they started with plus what their APIs' loads measured by more than the limit (bytes over,
        each)."""
        out = []
        for handle in self if limit_mib else ():
            if not handle.weigh_at or now < handle.weigh_at or handle.stopping or handle.loading:
                continue
            handle.weigh_at = 0.0
            try:
                rss = psutil.Process(handle.pid).memory_info().rss
            except psutil.Error:
                continue
            over = rss - bodies.answers_held(os.getpid(), handle.pid) - handle.base_rss - sum(handle.rss.values())
            if over > limit_mib << 20:
                out.append((handle, over))
        return out

    def murder_silent(self, limit: float) -> None:
        """A worker whose heartbeat is older than ``limit`` seconds (hung, or stopped) is killed and replaced."""
        now = time.time()
        for handle in self:
            silent = now - self.scoreboard.last_beat(handle.slot)
            if silent > limit and not handle.stopping:
                log.error("model worker %d (%s) pid %d sent no heartbeat for %.0fs; killing it", handle.slot,
                          handle.device.label, handle.pid, silent)
                detail = f"silent {silent:.0f}s" + (f"; API {handle.hung}'s predict() hung" if handle.hung else "")
                self.kill(handle, signal.SIGKILL, "heartbeat", detail)

    def murder_fat(self, limit_mib: int) -> None:
        """[workers] max_rss_mib: a worker whose resident memory passed it is killed and replaced."""
        for handle in self if limit_mib else ():
            try:
                rss = psutil.Process(handle.pid).memory_info().rss
            except psutil.Error:
                continue  # gone already: reaping will say why
            if rss > limit_mib * 2**20:  # its large answers' files in /dev/shm are not its own memory
                rss -= bodies.answers_held(os.getpid(), handle.pid)
            if rss > limit_mib * 2**20 and not handle.stopping:
                log.error("model worker %d (%s) pid %d uses %d MiB, over [workers] max_rss_mib = %d; killing it "
                          "(APIs: %s)", handle.slot, handle.device.label, handle.pid, rss >> 20, limit_mib,
                          ", ".join(sorted(handle.loaded)) or "none")
                self.kill(handle, signal.SIGKILL, "memory", f"{rss >> 20} MiB > {limit_mib} MiB; APIs: "
                          f"{', '.join(sorted(handle.loaded)) or 'none'}")

    # -- reconcile's actions ---------------------------------------------------------------------------------------
    def carry_out(self, action: LoadApi | UnloadApi | KillForDeadline, catalog: Catalog, load_timeout: float) -> None:
        """Send a load or an unload, or kill a worker whose load ran past its deadline."""
        handle = self.workers[action.worker]
        self.changed = True
        if isinstance(action, KillForDeadline):
            log.error("API %s version %s: __init__ exceeded %gs on model worker %d; killing the worker",
                      action.api, action.version, load_timeout, handle.slot)
            handle.loading.pop(action.api, None)
            catalog.load_failed(action.api, action.version, f"__init__ took longer than the load deadline "
                                f"({load_timeout:g}s); raise [predictors] load_timeout if it is just slow")
            self.kill(handle, signal.SIGKILL, "load_timeout", f"API {action.api} version {action.version}")
        elif isinstance(action, UnloadApi):
            if handle.send(Unload(action.api)):
                handle.unloading.add(action.api)
                log.info("unloading API %s from model worker %d (%s)", action.api, handle.slot, handle.device.label)
        else:
            record = catalog.apis[action.api]
            target = record.target()
            assert target is not None and target[0] == action.version, "reconcile loads the API's target"
            version, source, settings = target
            serving = settings.serving
            if handle.send(Load(source, version, dict(settings.config), dataclasses.asdict(serving), record.slot)):
                handle.loading[action.api] = (version, time.monotonic() + load_timeout)
                handle.threads[action.api] = serving.threads * serving.max_batch_size  # jobs it runs at once
                handle.lanes[action.api] = serving.threads  # predict() calls at once
                log.info("loading API %s version %s on model worker %d (%s)%s", action.api, version, handle.slot,
                         handle.device.label, "" if version == record.version else ", the last good version")

    # -- what they serve -------------------------------------------------------------------------------------------
    def replicas(self, name: str) -> list[Replica]:
        """The workers that take an API's jobs now (not one whose health() fails there)."""
        return [Replica(h.slot, h.pid, h.device.label, h.socket_path, h.loaded[name], h.threads.get(name, 1), h.row,
                        h.lanes.get(name, 1))
                for h in self.workers.values() if name in h.loaded and name not in h.unloading and not h.stopping
                and name not in h.unhealthy]

    def unhealthy(self, name: str) -> list[dict[str, object]]:
        """The replicas of an API whose health() fails, with why (status shows them; routes leave them out)."""
        return [{"worker": h.slot, "pid": h.pid, "device": h.device.label, "version": h.loaded.get(name),
                 "problem": h.unhealthy[name].as_dict()} for h in self.workers.values() if name in h.unhealthy]

    def in_use(self) -> set[tuple[str, str]]:
        """(API, version) pairs loaded or loading on some worker."""
        out = set()
        for h in self.workers.values():
            out |= set(h.loaded.items()) | {(name, version) for name, (version, _) in h.loading.items()}
        return out

    def stop_all(self, timeout: float) -> None:
        """SIGTERM every model worker, wait for them to drain, SIGKILL what is left."""
        for handle in self:
            handle.stopping = True
            self.kill(handle, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            for handle, status in self.reap():
                log.info("model worker %d (%s) pid %d stopped: %s", handle.slot, handle.device.label, handle.pid,
                         describe_exit(status))
            time.sleep(0.05)
        for handle in self:
            log.warning("model worker %d pid %d did not stop in %.0fs; killing it", handle.slot, handle.pid, timeout)
            self.kill(handle, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.workers and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
