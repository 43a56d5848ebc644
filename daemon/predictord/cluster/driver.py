"""`predictord ray`: deploy every API of the predictors directory as a Ray Serve application at ``/NAME``, and keep
the cluster in step with the directory. The daemon's own reader (watcher, debounce, permission guard, snapshots)
and probe decide what changed and whether it loads; Serve does the rest: a new version is a rolling update, a
broken one is never deployed (the old one keeps serving, the error is in `predictord status --ray`), a deleted one
is deleted. Each version travels to the nodes as its application's runtime_env working directory: a bundle of the
checked code and the folder's other files."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import logs, probe, requirements
from ..config import ApiSettings, Config, ConfigError, load_api_settings
from ..master.reader import DirectoryReader, Reading, Seen
from ..protocol import Problem
from ..sources import code_of, is_ignored, next_load
from .options import serve_options

log = logging.getLogger("predictord.ray")
MAX_BUNDLE = 512 * 2**20  # bytes: Ray ships a working_dir through its object store (RAY_max_grpc_message_size)
NOT_FOUND_APP = "predictord-not-found"


@dataclass
class Api:
    """One API as the driver tracks it."""

    name: str
    version: str = ""  # the newest seen
    stamp: str = ""
    serving: str = ""  # the version Serve runs
    origin: Any = None
    error: Problem | None = None
    warnings: list[str] = field(default_factory=list)
    state: str = "checking"  # checking, deploying, ready, failed

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "wanted": self.version, "serving": self.serving, "state": self.state,
                "error": self.error.as_dict() if self.error else None, "warnings": self.warnings,
                "source": str(self.origin.code) if self.origin is not None else None}


def code_in(seen: Seen, bundle: Path) -> Path:
    """Where a bundle holds the version's code: a folder predictor's in a folder of its name (the replica's entry,
    and its ``predictor_dir`` with the folder's files), a file's at the top."""
    return bundle / seen.name if seen.origin.folder is not None else bundle


def entry_of(seen: Seen) -> str:
    """What the replica loads, relative to its working directory (the bundle): a folder predictor's folder, or a
    file predictor's file."""
    assert seen.snapshot is not None
    return seen.name if seen.origin.folder is not None else seen.snapshot.code.name


def pip_of(seen: Seen, where: Path, settings: ApiSettings) -> list[str] | str | None:
    """The version's requirements as its runtime_env ``pip``: the lines of its [dependencies] pip, or the path of
    its requirements file in the bundle ``where``; None when it declares none."""
    assert seen.snapshot is not None
    declared = requirements.declared(seen.snapshot.folder, settings.dependencies.pip, seen.snapshot.settings)
    if declared is None:
        return None
    if declared.file is None:
        return list(declared.lines)
    return str(code_in(seen, where) / declared.file.relative_to(seen.snapshot.root))


def bundle(seen: Seen, dest: Path) -> Path:
    """The version's working directory for Ray: its snapshot (the code that was checked) and, for a folder
    predictor, the folder's other files (weights, vocabularies), within Ray's size limit."""
    assert seen.snapshot is not None
    if dest.exists():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(seen.snapshot.root, code_in(seen, partial))
    origin = seen.origin
    if origin.folder is not None:
        size = 0
        target = code_in(seen, partial)
        code = {p.relative_to(origin.folder) for p in origin.code_files()}
        for root, dirs, files in os.walk(origin.folder):
            dirs[:] = [d for d in dirs if not is_ignored(d)]
            for f in files:
                rel = (Path(root) / f).relative_to(origin.folder)
                if is_ignored(f) or rel in code or not (Path(root) / f).is_file():
                    continue
                size += (Path(root) / f).stat().st_size
                if size > MAX_BUNDLE:
                    shutil.rmtree(partial, ignore_errors=True)
                    raise ValueError(f"{origin.folder}: more than {MAX_BUNDLE >> 20} MiB of files, which Ray cannot "
                                     "ship as a working directory; keep large weights in storage the nodes reach")
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(root) / f, target / rel)
    os.replace(partial, dest)
    return dest


class Driver:
    """The loop of `predictord ray`: readings of the directory in, probes and deploys out."""

    def __init__(self, config: Config, serve: Any, registry: Any, replica_cpus: float, cluster_gpus: float) -> None:
        self.config = config
        self.serve = serve
        self.registry = registry
        self.replica_cpus, self.cluster_gpus = replica_cpus, cluster_gpus
        self.runtime = Path(tempfile.mkdtemp(prefix="predictord-ray-"))
        self.wake = threading.Event()
        p = config.predictors
        self.reader = DirectoryReader(config.predictors_dir, self.runtime, p.check_permissions, self.wake.set)
        self.apis: dict[str, Api] = {}
        self.probes = ThreadPoolExecutor(config.max_probes, thread_name_prefix="probe")
        self.deploys = ThreadPoolExecutor(1, thread_name_prefix="deploy")  # Serve's calls, one at a time
        self.pending: list[tuple[str, str, str, Future[Any]]] = []  # (what, name, version, future)
        self.stopping = False

    def run(self) -> None:
        logs.set_role("ray")
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.reader.start(self.config.predictors.watch, self.config.predictors.debounce)
        self.reader.request(None)
        log.info("predictord ray: serving %s on Ray Serve at http://%s:%d/NAME", self.config.predictors_dir,
                 self.config.server.host, self.config.server.port)
        while not self.stopping:
            self.wake.wait(1.0)
            self.wake.clear()
            for reading in self.reader.take():
                self.apply(reading)
            self.collect()
            self.registry.beat.remote({"pid": os.getpid(), "host": socket.gethostname(),
                                       "predictors": str(self.reader.directory)})
        self.reader.stop()
        self.probes.shutdown(wait=False, cancel_futures=True)
        self.deploys.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.runtime, ignore_errors=True)
        log.info("predictord ray: stopped; the applications keep serving their last versions")

    def stop(self, *_: Any) -> None:
        self.stopping = True
        self.wake.set()

    # -- the directory --------------------------------------------------------------------------------------------
    def apply(self, reading: Reading) -> None:
        for name in set(self.apis) - set(reading.apis) - set(reading.clashes):
            if reading.only is None or name in reading.only:
                log.info("API %s was removed; deleting its application", name)
                del self.apis[name]
                self.submit("delete", name, "", self.delete, name)
        for name, (file, folder) in reading.clashes.items():
            api = self.apis.setdefault(name, Api(name))
            self.refuse(api, Problem(f"two sources for API {name!r}: {file} and the folder {folder}/; remove or "
                                     "rename one of them", str(file), kind="clash"))
        for seen in reading.apis.values():
            self.saw(seen)

    def saw(self, seen: Seen) -> None:
        api = self.apis.setdefault(seen.name, Api(seen.name))
        if seen.problem is not None:
            self.refuse(api, seen.problem)
            return
        if code_of(api.version) == seen.version and api.stamp == seen.stamp and api.origin == seen.origin:
            return
        same = code_of(api.version) == seen.version and api.origin == seen.origin
        version = next_load(api.version) if same else seen.version
        api.version, api.stamp, api.origin = version, seen.stamp, seen.origin
        api.state = "checking" if not api.serving else api.state
        self.publish(api)
        assert seen.snapshot is not None
        path = seen.snapshot.folder or seen.snapshot.code
        self.submit("probe", api.name, version, self.check, path, seen)

    def refuse(self, api: Api, problem: Problem) -> None:
        if api.error is None or api.error.message != problem.message:
            log.error("API %s refused: %s", api.name, problem)
        api.error = problem.stamped(api.version)
        api.state = "failed" if not api.serving else "ready"
        self.publish(api)

    # -- probes and deploys, off the loop -------------------------------------------------------------------------
    def submit(self, what: str, name: str, version: str, fn: Any, *args: Any) -> None:
        pool = self.probes if what == "probe" else self.deploys
        future = pool.submit(fn, *args)
        future.add_done_callback(lambda _: self.wake.set())
        self.pending.append((what, name, version, future))

    def check(self, path: Path, seen: Seen) -> tuple[dict[str, Any], Seen]:
        """The daemon's probe (import and signature), unless the version declares requirements: those exist only
        in its runtime_env on the nodes, so Serve's own start of the replica is its check."""
        assert seen.snapshot is not None
        try:
            settings = load_api_settings(seen.snapshot.settings)
            declared = requirements.declared(seen.snapshot.folder, settings.dependencies.pip, seen.snapshot.settings)
        except (ConfigError, ValueError) as e:
            return {"ok": False, "error": Problem(str(e), str(seen.origin.settings)).as_dict()}, seen
        if declared is not None:
            return {"ok": True}, seen
        return probe.run(path, init=False, timeout=self.config.predictors.load_timeout), seen

    def collect(self) -> None:
        """Act on the probes and deploys that finished."""
        done = [p for p in self.pending if p[3].done()]
        self.pending = [p for p in self.pending if not p[3].done()]
        for what, name, version, future in done:
            api = self.apis.get(name)
            if api is None or (version and api.version != version):
                continue  # deleted, or a newer version came meanwhile
            try:
                result = future.result()
            except Exception as e:  # noqa: BLE001 - Serve's and the filesystem's errors: shown on the API
                self.refuse(api, Problem(f"{what} failed: {type(e).__name__}: {e}", kind="deploy"))
                continue
            if what == "probe":
                outcome, seen = result
                if not outcome["ok"]:
                    self.refuse(api, user_paths(Problem.from_dict(outcome["error"]), seen))
                    continue
                api.state = "deploying" if not api.serving else api.state
                self.submit("deploy", name, version, self.deploy, api.name, version, seen)
            elif what == "deploy":
                api.serving, api.error, api.state = version, None, "ready"
                log.info("API %s version %s serving on Ray Serve", name, version)
                self.publish(api)

    def deploy(self, name: str, version: str, seen: Seen) -> None:
        """One application per API: a rolling update when it exists (Serve starts the new replicas before it stops
        the old ones)."""
        from .replica import PredictorReplica

        assert seen.snapshot is not None
        settings: ApiSettings = load_api_settings(seen.snapshot.settings)
        options = serve_options(settings.serving, self.replica_cpus, self.cluster_gpus)
        api = self.apis[name]
        api.warnings = options.warnings
        for warning in options.warnings:
            log.warning("API %s: %s", name, warning)
        where = bundle(seen, self.runtime / "bundles" / f"{name}-{version}")
        runtime_env: dict[str, Any] = {"working_dir": upload(where)}
        pip = pip_of(seen, where, settings)
        if pip is not None:
            runtime_env["pip"] = pip
        deployment = dict(options.deployment)
        deployment["ray_actor_options"] = {**deployment["ray_actor_options"], "runtime_env": runtime_env}
        app = self.serve.deployment(name=name)(PredictorReplica).options(**deployment).bind(
            name, version, entry_of(seen), dict(settings.config), dataclasses.asdict(settings.serving))
        self.serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)

    def delete(self, name: str) -> None:
        self.registry.drop.remote(name)
        self.serve.delete(name)

    def publish(self, api: Api) -> None:
        self.registry.put.remote(api.name, api.record())


def upload(folder: Path) -> str:
    """Put a bundle into the cluster's storage (GCS) and name it by its contents, for a runtime_env working_dir:
    Serve takes a local folder only at the job level, so this is what `serve deploy` does for one (Ray's packaging
    module; predictord pins the Ray release it was tested with)."""
    from ray._private.runtime_env.packaging import get_uri_for_directory, upload_package_if_needed

    uri: str = get_uri_for_directory(str(folder), include_gitignore=False)
    upload_package_if_needed(uri, str(folder.parent), str(folder), include_gitignore=False, logger=log)
    return uri


def user_paths(problem: Problem, seen: Seen) -> Problem:
    """A problem that names the snapshot, pointed at the user's files."""
    assert seen.snapshot is not None
    root, home = str(seen.snapshot.root), str(seen.origin.root)
    file = problem.file.replace(root, home) if problem.file else problem.file
    return dataclasses.replace(problem, message=problem.message.replace(root, home), file=file)


def main(config: Config, address: str | None, replica_cpus: float) -> int:
    """Connect to the cluster, start Serve's proxies on [server] host and port, and run the driver's loop."""
    import ray
    from ray import serve

    from .registry import NAME as REGISTRY_NAME
    from .registry import connect, registry
    from .replica import NotFound

    connect(address)
    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    gpus = float(ray.cluster_resources().get("GPU", 0))
    reg = registry()
    not_found = serve.deployment(name=NOT_FOUND_APP, ray_actor_options={"num_cpus": 0})(NotFound)
    serve.run(not_found.bind(REGISTRY_NAME), name=NOT_FOUND_APP, route_prefix="/", blocking=False)
    ignored = [t for t in ("workers", "rebalance") if getattr(config, t) != type(getattr(config, t))()]
    if ignored:
        log.warning("predictord ray: [%s] of %s do not apply on Ray (Serve places and scales the replicas)",
                    "], [".join(ignored), config.path)
    Driver(config, serve, reg, replica_cpus, gpus).run()
    return 0
