"""The master's catalog of APIs: what the reader found in the directory, probing each new version in a throwaway
process (at most max_probes at once), what each model worker reports about its loads, and placement (the catalog is
its one writer)."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .. import metrics, probe, requirements
from ..config import Config, ConfigError, load_api_settings
from ..envs import EnvInfo
from ..logs import shown
from ..protocol import Failed, Health, Loaded, Problem
from ..sources import ApiSource, code_of, next_load
from .autopsy import Autopsy
from .environments import Environments
from .placement import Want, WorkerSlot, place
from .reader import Reading, Seen, prune_snapshots
from .reconcile import Wanted
from .records import ApiRecord, Events

log = logging.getLogger("predictord.master")
REFUSALS = ("permissions", "unreadable", "name")  # refused before loading: looked at again on the next reading


class Probe(NamedTuple):
    """A throwaway process importing one version of an API."""

    process: subprocess.Popen[bytes]
    version: str
    deadline: float  # monotonic
    chunks: list[bytes]  # its output so far


class Catalog:
    """Every API the directory holds: its versions, their probes, its placement and its errors."""

    def __init__(self, config: Config, runtime: Path, events: Events) -> None:
        self.config = config
        self.runtime = runtime
        self.events = events
        self.apis: dict[str, ApiRecord] = {}
        self.probes: dict[str, Probe] = {}
        self.waiting: list[str] = []  # APIs whose probe waits for a turn ([predictors] max_probes)
        self.peak_probes = 0
        self.notes: dict[str, str] = {}  # entries of the directory that are no API, and why
        self.max_apis = config.predictors.max_apis
        self.max_probes = config.max_probes
        self.envs = Environments(config, runtime)
        self.needs_plan = True  # something placement depends on changed
        self.changed = True  # something status shows changed

    # -- the directory (as the reader thread saw it) ---------------------------------------------------------------
    def apply(self, reading: Reading) -> None:
        """Make the records match a reading of the directory (all of it, or just the APIs it covers): probe new and
        changed APIs, drop removed ones, refuse what the reader refused and a name with two sources (a version
        already serving keeps serving)."""
        covered = reading.only
        for name in set(self.apis) - set(reading.apis) - set(reading.clashes):
            if covered is None or name in covered:
                log.info("API %s was removed; unloading it", shown(name))
                self.events.add("removed", f"API {name} was removed")
                self.drop_probe(name)
                del self.apis[name]
        for name, note in reading.notes.items():
            if self.notes.get(name) != note:
                log.warning("%s", note)
        self.notes = {**(self.notes if covered is not None else {}), **reading.notes}
        for name, (file, folder) in reading.clashes.items():
            self.clash(name, file, folder)
        for seen in reading.apis.values():
            self.saw(seen)
        self.fill_room()
        self.needs_plan = self.changed = True

    def saw(self, seen: Seen) -> None:
        """One API as the reader found it."""
        name, record = seen.name, self.apis.get(seen.name)
        if record is not None and record.error is not None and record.error.kind == "clash":
            log.info("API %s: one source left (%s); the clash is resolved", shown(name), seen.origin.root)
            record.error = None
        if seen.problem is not None:
            if record is None:
                record = self.new_record(name, seen.origin, "")
            if record.error is None or record.error.message != seen.problem.message:
                log.error("API %s refused: %s", shown(name), seen.problem)
                self.events.add("failed", f"API {name} refused: {seen.problem}")
            self.drop_probe(name)
            record.origin, record.probing, record.check = seen.origin, False, None
            record.error = seen.problem.stamped(record.version)
            return
        refused = record is not None and record.error is not None and record.error.kind in REFUSALS
        version = seen.version
        same = record is not None and code_of(record.version) == seen.version and record.origin == seen.origin
        if record is not None and same and record.stamp == seen.stamp:
            if not refused:
                return
            version = record.version
            record.failed_versions.discard(version)  # a chmod or a fix of the directory: check it again
            record.error = None
        elif record is not None and same:
            version = next_load(record.version)
            log.info("API %s was touched or moved in anew with the same code (version %s -> %s); loading it again",
                     shown(name), record.version, version)
        elif record is not None:
            log.info("API %s changed (version %s -> %s); checking the new version", shown(name), record.version,
                     version)
            record.failed_versions.discard(version)  # saved again: a version that failed before gets another try
        else:
            log.info("API %s found (version %s); checking it", shown(name), version)
            record = self.new_record(name, seen.origin, version)
        assert seen.snapshot is not None
        record.origin, record.version, record.source, record.stamp = seen.origin, version, seen.snapshot, seen.stamp
        record.changed()
        self.start_probe(record)

    def new_record(self, name: str, source: ApiSource, version: str) -> ApiRecord:
        """A record for an API seen for the first time, in a free scoreboard column; with none free, it waits for
        one (failed, with the reason: it is visible, and loads once another API is removed)."""
        free = sorted(set(range(self.max_apis)) - {r.slot for r in self.apis.values()})
        record = self.apis[name] = ApiRecord(name, free[0] if free else -1, source, version)
        if not free:
            log.error("API %s: %s", shown(name), self.no_room())
        return record

    def no_room(self) -> Problem:
        n = self.max_apis
        return Problem(f"more than {n} APIs ([predictors] max_apis = {n}); it is loaded once another API is "
                       "removed, or raise max_apis", kind="room")

    def fill_room(self) -> None:
        """Give free scoreboard columns to the APIs that wait for one (in name order) and check them."""
        free = sorted(set(range(self.max_apis)) - {r.slot for r in self.apis.values()})
        for name in sorted(n for n, r in self.apis.items() if r.slot < 0):
            record = self.apis[name]
            if not free:
                if record.error is None or record.error.kind != "room":
                    record.error = self.no_room().stamped(record.version)
                continue
            record.slot = free.pop(0)
            if record.error is not None and record.error.kind == "room":
                record.error = None
            if record.version and record.source.home is not None:  # it has a copy: check it now
                self.start_probe(record)

    def clash(self, name: str, file: Path, folder: Path) -> None:
        """``NAME.py`` and ``NAME/`` both exist: refuse both (said once); a version already serving keeps serving
        until one of them goes."""
        record = self.apis.get(name)
        if record is not None and record.error is not None and record.error.kind == "clash":
            return
        problem = Problem(f"two sources for API {name!r}: {file} and the folder {folder}/; remove or rename one of "
                          "them", str(file), kind="clash")
        log.error("API %s refused: %s", shown(name), problem.message)
        self.events.add("failed", f"API {name} refused: {problem.message}")
        if record is None:
            record = self.new_record(name, ApiSource(name, file, file.with_suffix(".toml")), "")
        self.drop_probe(name)
        record.probing = False
        record.error = problem.stamped(record.version)
        self.needs_plan = self.changed = True

    def drop_probe(self, name: str) -> None:
        """Kill an API's probe, if one runs, and its waiting turn (its outcome no longer matters)."""
        if name in self.waiting:
            self.waiting.remove(name)
        old = self.probes.pop(name, None)
        if old is not None:
            probe.end(old.process)
            for stream in (old.process.stdout, old.process.stderr):
                if stream:
                    stream.close()
            self.start_waiting()

    def prune_snapshots(self, in_use: Iterable[tuple[str, str]], now: float | None = None) -> None:
        """Drop the code copies of versions nothing will load again: not wanted, not the fallback, not on a worker
        (``in_use``: the (API, version) pairs the workers have loaded or are loading), and not just made (the
        reader may have copied a version the master has not heard of yet)."""
        keep = {f"{name}-{code_of(version)}" for name, version in in_use}
        for name, record in self.apis.items():
            keep |= {f"{name}-{code_of(v)}" for v in (record.version, record.good[0] if record.good else "") if v}
        prune_snapshots(self.runtime / "snapshots", keep, time.time() if now is None else now)

    # -- probes ----------------------------------------------------------------------------------------------------
    def start_probe(self, record: ApiRecord, retry: bool = True) -> None:
        """Check a version in a throwaway process (in its environment, built first when it declares requirements),
        or queue it while max_probes probes run. ``retry``: build again an environment that failed before."""
        self.drop_probe(record.name)
        if record.slot < 0:
            record.probing = False
            return  # it waits for room first (fill_room checks it then)
        record.probing = True
        ready, info = self.environment(record, retry)
        if not ready:
            return  # its environment is being built (env_done starts the probe), or failed
        if len(self.probes) >= self.max_probes:
            self.waiting.append(record.name)
            record.check = f"waiting to be checked ({self.max_probes} probes run at once: [predictors] max_probes)"
            return
        record.check = "being checked"
        proc = probe.start(record.source.folder or record.source.code, init=False, stderr=tempfile.TemporaryFile(),
                           home=record.source.home, env=info.path if info else None)
        os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.config.predictors.load_timeout
        self.probes[record.name] = Probe(proc, record.version, deadline, [])
        self.peak_probes = max(self.peak_probes, len(self.probes))

    def environment(self, record: ApiRecord, retry: bool) -> tuple[bool, EnvInfo | None]:
        """Whether a version can be checked now, and the environment it runs in (None: the daemon's own packages).
        One that declares requirements waits while its environment builds in the background."""
        try:
            settings = load_api_settings(record.source.settings)
            declared = requirements.declared(record.source.folder, settings.dependencies.pip, record.source.settings)
        except ConfigError:
            declared = None  # the probe reports the settings file's error
        except ValueError as e:
            self.env_failed(record, record.user_paths(Problem(str(e), str(record.source.settings))))
            return False, None
        if declared is None:
            record.envs[record.version] = None
            return True, None
        key = record.envs[record.version] = self.envs.key_of(declared)
        keep = {record.version, record.good[0] if record.good else ""}
        record.envs = {v: k for v, k in record.envs.items() if v in keep}  # older versions' keys: never asked again
        info = self.envs.get(key)
        if info is not None:
            return True, info
        self.envs.want(key, declared, retry)
        if key in self.envs.failed:
            self.env_failed(record, record.user_paths(self.envs.failed[key]))
        else:
            record.check = self.envs.describe(key, time.monotonic())
        return False, None

    def env_done(self) -> None:
        """Builds that finished: the versions waiting for them are checked now, or fail with the install's error;
        while builds run, what waits shows their progress."""
        now = time.monotonic()
        for key, problem in self.envs.take_done():
            for record in list(self.apis.values()):
                if record.probing and record.envs.get(record.version) == key and record.name not in self.probes \
                        and record.name not in self.waiting:
                    if problem is None:
                        self.start_probe(record, retry=False)
                    else:
                        self.env_failed(record, record.user_paths(problem))
            self.changed = True
        for record in self.apis.values():
            waits_for = record.envs.get(record.version)
            if record.probing and waits_for is not None and waits_for in self.envs.builds:
                record.check = self.envs.describe(waits_for, now)
                self.changed = True

    def env_failed(self, record: ApiRecord, problem: Problem) -> None:
        record.probing, record.check = False, None
        if record.version not in record.failed_versions or record.error != problem.stamped(record.version):
            metrics.get().loads.labels(record.name, "reload" if record.loaded_at else "load", "failed").inc()
            log.error("API %s version %s: %s", record.name, record.version, problem.message)
            self.events.add("failed", f"API {record.name} version {record.version}: {problem.message}")
        record.fail(problem, record.version)
        self.needs_plan = self.changed = True

    def env_info(self, name: str) -> EnvInfo | None:
        """The environment an API's target version runs in (None: the daemon's own packages)."""
        record = self.apis.get(name)
        key = record.target_env() if record is not None else None
        return self.envs.get(key) if key is not None else None

    def environment_status(self, record: ApiRecord) -> dict[str, Any] | None:
        """GET /NAME's environment: that of the newest version (the one being built or checked), else none."""
        key = record.envs.get(record.version)
        if key is None:
            return None
        status = self.envs.status(key, time.monotonic())
        if "error" in status:
            status["error"] = record.user_paths(Problem(status["error"])).message
        return status

    def envs_in_use(self) -> set[str]:
        """The environments some version may still run in: each API's newest and its fallback."""
        keys = {r.envs.get(r.version) for r in self.apis.values()}
        keys |= {r.envs.get(r.good[0]) for r in self.apis.values() if r.good is not None}
        return {k for k in keys if k is not None}

    def start_waiting(self) -> None:
        """Start the probes that waited for a turn, oldest first."""
        while self.waiting and len(self.probes) < self.max_probes:
            record = self.apis.get(self.waiting.pop(0))
            if record is not None and record.probing:
                self.start_probe(record)

    def probe_fds(self) -> dict[int, str]:
        """The probes' output pipes, for the master's select."""
        return {p.process.stdout.fileno(): name for name, p in self.probes.items() if p.process.stdout}

    def read_probe(self, name: str) -> None:
        """A probe's output is readable: keep it, or at its end, judge the probe."""
        proc, _, _, chunks = self.probes[name]
        assert proc.stdout is not None
        try:
            data = proc.stdout.read()
        except BlockingIOError:
            return
        if data:
            chunks.append(data)
            return
        try:
            proc.wait(timeout=1)  # its output is over: it is exiting
        except subprocess.TimeoutExpired:
            proc.kill()
        stderr = b""
        if proc.stderr:
            proc.stderr.seek(0)
            stderr = proc.stderr.read()
        self.finish_probe(name, probe.outcome(self.apis[name].source.code if name in self.apis else Path(name),
                                              b"".join(chunks), stderr or b"", proc.returncode))

    def expire_probes(self, now: float) -> None:
        """A probe past the load deadline is killed and its version fails."""
        timeout = self.config.predictors.load_timeout
        for name, p in list(self.probes.items()):
            if now > p.deadline:
                probe.end(p.process)
                file = str(self.apis[name].user_source.code) if name in self.apis else name
                self.finish_probe(name, {"ok": False, "error": Problem(
                    f"importing it took longer than the load deadline ({timeout:g}s)", file).as_dict()})

    def finish_probe(self, name: str, result: dict[str, Any]) -> None:
        proc, version, _, _ = self.probes.pop(name)
        probe.end(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
        self.start_waiting()
        record = self.apis.get(name)
        if record is None or record.version != version:
            return  # removed or changed meanwhile; a newer probe decides
        record.probing, record.check = False, None
        self.needs_plan = self.changed = True
        if not result["ok"]:
            metrics.get().loads.labels(name, "reload" if record.loaded_at else "load", "failed").inc()
            problem = record.user_paths(Problem.from_dict(result["error"]))
            record.fail(problem, version)
            log.error("API %s version %s is broken: %s", name, version, problem)
            self.events.add("failed", f"API {name} version {version} is broken: {problem}")
            return
        try:
            record.settings = load_api_settings(record.source.settings)
        except ConfigError as err:
            settings = record.source.settings  # named once, as the problem's file
            record.fail(record.user_paths(Problem(err.detail(settings), str(settings))), version)
            log.error("API %s: %s", name, err)
            return
        record.signature = result["signature"]
        log.info("API %s version %s passed its checks: predict(%s)", name, version,
                 ", ".join(result["signature"]["predict"]))

    # -- what the model workers report -----------------------------------------------------------------------------
    def loaded(self, m: Loaded, worker: int, device: str) -> None:
        """Model worker ``worker`` (on ``device``) finished loading a version."""
        name, version = m.api, m.version
        record = self.apis.get(name)
        kind = "reload" if record is not None and (set(record.loaded_at) - {version}) else "load"
        metrics.get().loads.labels(name, kind, "ok" if m.ok else "failed").inc()
        self.changed = True
        if m.problem is None:
            metrics.get().load_seconds.labels(name).observe(m.seconds)
            if record is not None:
                record.loaded_at.setdefault(version, time.time())
                record.footprint = m.footprint or record.footprint
                if version == record.version:
                    record.error = None  # the wanted version serves: older failures are history (in the log)
                    if record.settings is not None:
                        record.good = (version, record.source, record.settings)
            log.info("API %s version %s ready on model worker %d (%s)", name, version, worker, device)
            self.events.add(kind, f"API {name} version {version} ready on {device} (worker {worker}) in "
                                  f"{m.seconds:.2f}s")
        elif record is not None:
            if version not in record.failed_versions:
                log.error("API %s version %s failed to load: %s", name, version, m.problem.message)
                self.events.add("failed", f"API {name} version {version} failed to load: {m.problem.message}")
            record.fail(record.user_paths(m.problem), version)

    def load_failed(self, name: str, version: str, message: str) -> None:
        """A load ended without a report (the worker died, or ran past the deadline): that version failed."""
        record = self.apis.get(name)
        if record is not None and record.version == version:
            record.fail(Problem(message, str(record.user_source.code)), version)
            self.changed = True

    def request_failed(self, m: Failed) -> None:
        """A model worker's report of predict() raising: the newest error and the count, for status."""
        record = self.apis.get(m.api)
        if record is not None:
            record.request_error = record.user_paths(m.problem)
            record.request_errors += m.count
            self.changed = True

    def health(self, m: Health, worker: int) -> None:
        """A replica's health() failed, passed again, or failed enough times that it is loaded again."""
        record = self.apis.get(m.api)
        if record is None:
            return
        self.changed = True
        if m.ok:
            self.events.add("healthy", f"API {m.api} on worker {worker} is healthy again")
            return
        assert m.problem is not None
        record.health = m.problem.stamped(m.version)
        if m.failures == 1 or m.reloading:
            then = "; loading it again" if m.reloading else "; out of the routes until it passes"
            self.events.add("unhealthy", f"API {m.api} on worker {worker}: health check failed {m.failures} time(s) "
                                         f"in a row: {m.problem.message}{then}")

    # -- crashes ---------------------------------------------------------------------------------------------------
    def names(self) -> dict[int, str]:
        """API name by scoreboard column."""
        return {r.slot: name for name, r in self.apis.items()}

    def api_of_file(self, path: str) -> str | None:
        """The API a source file (a traceback frame's) belongs to, if any."""
        for name, record in self.apis.items():
            if record.user_source.own_files()(path) or record.source.own_files()(path):
                return name
        return None

    def crashed(self, autopsy: Autopsy, worker: int, contain: bool) -> None:
        """An API's code ended a model worker: note it where people look; with ``contain`` (a CPU API), move it to
        workers of its own, so its next crash hurts no other API; past [workers] crash_limit within crash_window,
        quarantine it (failed, 503 with the reason, not loaded again until its files change)."""
        record = self.apis.get(autopsy.culprit or "")
        if record is None:
            return
        now = time.monotonic()
        workers = self.config.workers
        record.crashes = [t for t in record.crashes if now - t < workers.crash_window] + [now]
        record.crash = Problem(f"{autopsy.why}, ending model worker {worker}", autopsy.file, autopsy.line,
                               "crash").stamped(record.version)
        self.needs_plan = self.changed = True
        if contain and not record.isolated:
            record.contained = True
            log.warning("API %s ended the model worker it shared; it runs in a model worker of its own until its "
                        "files change", record.name)
            self.events.add("contain", f"API {record.name} runs in a model worker of its own after ending a shared "
                                       "one")
        if not workers.crash_limit or len(record.crashes) < workers.crash_limit or record.quarantined:
            return
        record.quarantined = True
        record.good = None  # nor is it the fallback: nothing of it loads again until its files change
        reason = (f"quarantined: its code ended the model worker process {len(record.crashes)} times in "
                  f"{workers.crash_window:g}s ([workers] crash_limit = {workers.crash_limit}); the last time it "
                  f"{autopsy.why}. Fix its files to load it again")
        record.error = Problem(reason, autopsy.file, autopsy.line, "quarantine").stamped(record.version)
        log.error("API %s is %s", record.name, record.error)
        self.events.add("failed", f"API {record.name} is {reason}")

    # -- placement: what is wanted, and where it goes --------------------------------------------------------------
    def want(self, name: str, replicas: int, steer: tuple[int, ...], note: str | None = None) -> None:
        """The rebalancer wants ``replicas`` of an API, on the workers in ``steer`` first; the next plan places it."""
        record = self.apis.get(name)
        if record is not None:
            record.scale, record.steer, record.rebalance_note = replicas, steer, note
            self.needs_plan = self.changed = True

    def plan(self, slots: list[WorkerSlot], room: Mapping[str, int]) -> None:
        """Recompute where every API goes (pure placement), keeping what already runs where it is."""
        self.needs_plan = False
        wants = {n: Want(r.settings.serving.device, r.replicas_wanted(), r.footprint, r.isolated,
                         str(self.envs.root / key) if (key := r.target_env()) else "")
                 for n, r in self.apis.items() if r.settings is not None and not r.quarantined}
        current = {n: r.steer if r.steer is not None else r.placement for n, r in self.apis.items()}
        for name, p in place(slots, wants, current, room).items():
            record = self.apis[name]
            before = (record.placement, record.note, record.error)
            record.placement, record.note, record.steer = p.slots, p.note, None
            if p.error and (record.error is None or record.error.message != p.error):
                record.error = Problem(p.error, str(record.user_source.settings)).stamped(record.version)
            self.changed |= (record.placement, record.note, record.error) != before

    def probe_status(self) -> dict[str, int]:
        """Probes running and waiting, the most that ran at once, and the limit (for status)."""
        return {"running": len(self.probes), "waiting": len(self.waiting), "peak": self.peak_probes,
                "limit": self.max_probes}

    def unplaced(self) -> bool:
        """An API that passed its checks has nowhere to go (it may fit once memory frees up)."""
        return any(r.settings is not None and not r.placement and not r.quarantined for r in self.apis.values())

    def wanted(self) -> dict[str, Wanted]:
        """Every API as reconcile sees it."""
        return {name: Wanted(t[0] if (t := r.target()) else None, r.placement) for name, r in self.apis.items()
                if not r.quarantined}  # a quarantined API is unwanted everywhere: its replicas unload
