"""The master's catalog of APIs: scanning the directory, probing each new version in a throwaway process, what each
model worker reports about its loads, and placement (the catalog is its one writer)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .. import metrics, probe
from ..config import Config, ConfigError, load_api_settings
from ..protocol import Failed, Loaded, Problem
from ..scoreboard import MAX_APIS
from ..sources import ApiSource, name_problem, scan, snapshot
from . import permissions
from .autopsy import Autopsy
from .placement import Want, WorkerSlot, place
from .reconcile import Wanted
from .records import ApiRecord, Events

log = logging.getLogger("predictord.master")


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
        self.needs_plan = True  # something placement depends on changed
        self.changed = True  # something status shows changed

    # -- the directory ---------------------------------------------------------------------------------------------
    def sync(self, only: set[str] | None = None) -> None:
        """Make the records match the directory (or just the APIs in ``only``): probe new and changed APIs, drop
        removed ones, and refuse a name with two sources (the version already serving keeps serving)."""
        found = scan(self.config.predictors_dir)
        apis, clashes = found.apis, found.clashes
        if only is not None:
            apis = {n: s for n, s in apis.items() if n in only}
            clashes = {n: c for n, c in clashes.items() if n in only}
        for name in set(self.apis) - set(apis) - set(clashes):
            if only is None or name in only:
                log.info("API %s was removed; unloading it", name)
                self.events.add("removed", f"API {name} was removed")
                self.drop_probe(name)
                del self.apis[name]
        for name, (file, folder) in clashes.items():
            self.clash(name, file, folder)
        for name, source in apis.items():
            version = source.version()
            record = self.apis.get(name)
            if record is not None and record.error is not None and record.error.kind == "clash":
                log.info("API %s: one source left (%s); the clash is resolved", name, source.folder or source.code)
                record.error = None
            refused = record is not None and record.error is not None and record.error.kind == "permissions"
            if record is not None and record.version == version and record.origin == source:
                if not refused:
                    continue
                record.failed_versions.discard(version)  # a chmod or chown changes no content: check again
            elif record is not None:
                log.info("API %s changed (version %s -> %s); checking the new version", name, record.version,
                         version)
            else:
                log.info("API %s found (version %s); checking it", name, version)
            if record is None:
                record = self.new_record(name, source, version)
                if record is None:
                    continue
            record.origin, record.version = source, version
            record.changed()
            try:
                record.source = snapshot(source, self.runtime / "snapshots" / f"{name}-{version}")
            except OSError as e:
                record.fail(Problem(f"cannot copy its code to check it: {e}", str(source.code)))
                continue
            self.start_probe(record)
        self.needs_plan = self.changed = True

    def new_record(self, name: str, source: ApiSource, version: str) -> ApiRecord | None:
        """A record for an API seen for the first time, in a free scoreboard column (None: none is free)."""
        free = sorted(set(range(MAX_APIS)) - {r.slot for r in self.apis.values()})
        if not free:
            log.error("API %s: more than %d APIs; not loading it", name, MAX_APIS)
            return None
        record = self.apis[name] = ApiRecord(name, free[0], source, version)
        return record

    def clash(self, name: str, file: Path, folder: Path) -> None:
        """``NAME.py`` and ``NAME/`` both exist: refuse both (said once); a version already serving keeps serving
        until one of them goes."""
        record = self.apis.get(name)
        if record is not None and record.error is not None and record.error.kind == "clash":
            return
        problem = Problem(f"two sources for API {name!r}: {file} and the folder {folder}/; remove or rename one of "
                          "them", str(file), kind="clash")
        log.error("API %s refused: %s", name, problem.message)
        self.events.add("failed", f"API {name} refused: {problem.message}")
        if record is None:
            record = self.new_record(name, ApiSource(name, file, file.with_suffix(".toml")), "")
            if record is None:
                return
        self.drop_probe(name)
        record.probing = False
        record.error = problem.stamped(record.version)
        self.needs_plan = self.changed = True

    def drop_probe(self, name: str) -> None:
        """Kill an API's probe, if one runs (its outcome no longer matters)."""
        old = self.probes.pop(name, None)
        if old is not None:
            old.process.kill()
            old.process.wait()
            for stream in (old.process.stdout, old.process.stderr):
                if stream:
                    stream.close()

    def prune_snapshots(self, in_use: Iterable[tuple[str, str]]) -> None:
        """Drop the code copies of versions nothing will load again: not wanted, not the fallback, not on a worker
        (``in_use``: the (API, version) pairs the workers have loaded or are loading)."""
        keep = {f"{name}-{version}" for name, version in in_use}
        for name, record in self.apis.items():
            keep.add(f"{name}-{record.version}")
            if record.good is not None:
                keep.add(f"{name}-{record.good[0]}")
        root = self.runtime / "snapshots"
        for entry in root.iterdir() if root.is_dir() else ():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    # -- probes ----------------------------------------------------------------------------------------------------
    def start_probe(self, record: ApiRecord) -> None:
        problem = name_problem(record.name)
        if not problem and self.config.predictors.check_permissions:
            problem = permissions.check_source(record.origin or record.source, self.config.predictors_dir)
            if problem:
                log.error("API %s refused: %s", record.name, problem)
        if problem:
            kind = "name" if name_problem(record.name) else "permissions"
            record.fail(Problem(problem, kind=kind))
            return
        self.drop_probe(record.name)
        record.probing = True
        proc = probe.start(record.source.folder or record.source.code, init=False, stderr=tempfile.TemporaryFile(),
                           home=record.source.home)
        os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.config.predictors.load_timeout
        self.probes[record.name] = Probe(proc, record.version, deadline, [])

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
            proc.wait(timeout=5)
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
                p.process.kill()
                file = str(self.apis[name].user_source.code) if name in self.apis else name
                self.finish_probe(name, {"ok": False, "error": Problem(
                    f"importing it took longer than the load deadline ({timeout:g}s)", file).as_dict()})

    def finish_probe(self, name: str, result: dict[str, Any]) -> None:
        proc, version, _, _ = self.probes.pop(name)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
        record = self.apis.get(name)
        if record is None or record.version != version:
            return  # removed or changed meanwhile; a newer probe decides
        record.probing = False
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
            record.fail(record.user_paths(Problem(str(err), str(record.source.settings))), version)
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
        wants = {n: Want(r.settings.serving.device, r.replicas_wanted(), r.footprint, r.isolated)
                 for n, r in self.apis.items() if r.settings is not None and not r.quarantined}
        current = {n: r.steer if r.steer is not None else r.placement for n, r in self.apis.items()}
        for name, p in place(slots, wants, current, room).items():
            record = self.apis[name]
            before = (record.placement, record.note, record.error)
            record.placement, record.note, record.steer = p.slots, p.note, None
            if p.error and (record.error is None or record.error.message != p.error):
                record.error = Problem(p.error, str(record.user_source.settings)).stamped(record.version)
            self.changed |= (record.placement, record.note, record.error) != before

    def unplaced(self) -> bool:
        """An API that passed its checks has nowhere to go (it may fit once memory frees up)."""
        return any(r.settings is not None and not r.placement and not r.quarantined for r in self.apis.values())

    def wanted(self) -> dict[str, Wanted]:
        """Every API as reconcile sees it."""
        return {name: Wanted(t[0] if (t := r.target()) else None, r.placement) for name, r in self.apis.items()
                if not r.quarantined}  # a quarantined API is unwanted everywhere: its replicas unload
