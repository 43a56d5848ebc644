"""The master's environments: which are built, which are building (at most [predictors] max_installs at once, each
in a builder process of its own, under [predictors] install_timeout), which failed, and which no version needs any
more (removed after [predictors] env_grace). The builds run in the background: the master's loop only starts them,
reads their one-line outcome, and kills them at their deadline."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import envs, requirements
from ..config import Config
from ..envs import EnvInfo
from ..protocol import Problem
from ..requirements import Declared

log = logging.getLogger("predictord.master")
LOG_TAIL = 4096  # bytes of an install's log read for its last line


@dataclass
class Build:
    """A builder process making one environment."""

    key: str
    declared: Declared
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # monotonic; 0 while it waits for a turn
    queued: float = field(default_factory=time.monotonic)
    chunks: list[bytes] = field(default_factory=list)


class Environments:
    """Every environment the APIs' versions ask for, by key."""

    def __init__(self, config: Config, runtime: Path) -> None:
        self.config = config
        self.runtime = runtime
        self.root = config.envs_dir(runtime)
        self.context = envs.key_context(config)
        self.ready: dict[str, EnvInfo] = {}
        self.builds: dict[str, Build] = {}
        self.failed: dict[str, Problem] = {}
        self.done: list[tuple[str, Problem | None]] = []  # finished builds, for the catalog
        self.unused_since: dict[str, float] = {}
        self.built = 0  # builds started (not reused): status shows it, tests count it

    def key_of(self, declared: Declared) -> str:
        return requirements.key(declared, *self.context)

    def get(self, key: str) -> EnvInfo | None:
        """The environment of ``key`` if it is built (here or by an earlier run of the daemon)."""
        info = self.ready.get(key)
        if info is None and key not in self.builds and envs.is_ready(self.root / key):
            info = self.add(key)
            log.info("environment %s: reusing %s%s", key, info.path, self.fresh_note(info))
        return info

    def add(self, key: str) -> EnvInfo:
        """A built environment joins the ready ones (with what of it clashes with the master's modules)."""
        loaded = {name.partition(".")[0] for name in sys.modules}
        info = self.ready[key] = envs.inspect(key, self.root / key, loaded)
        return info

    @staticmethod
    def fresh_note(info: EnvInfo) -> str:
        return (f"; it holds its own {', '.join(info.conflicts)}, which the master imported: its workers start "
                "from a fresh interpreter (slower to start)") if info.fresh else ""

    def want(self, key: str, declared: Declared, retry: bool) -> None:
        """Build ``key`` unless it is built or building; ``retry``: even if it failed before (its files changed)."""
        if key in self.builds or self.get(key) is not None:
            return
        if key in self.failed and not retry:
            return
        self.failed.pop(key, None)
        self.builds[key] = Build(key, declared)
        self.start_waiting()

    def start_waiting(self) -> None:
        running = sum(1 for b in self.builds.values() if b.process is not None)
        for build in sorted(self.builds.values(), key=lambda b: b.queued):
            if running >= self.config.predictors.max_installs:
                return
            if build.process is None:
                self.start(build)
                running += 1

    def start(self, build: Build) -> None:
        dest = self.root / build.key
        self.root.mkdir(parents=True, exist_ok=True)
        spec_path = self.root / f"{build.key}.spec.json"
        spec_path.write_text(json.dumps(envs.spec_for(self.config, build.key, build.declared, dest)))
        build.process = subprocess.Popen([sys.executable, "-m", "predictord.envs", str(spec_path)],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)  # its own group: a kill at the deadline takes pip
        os.set_blocking(build.process.stdout.fileno(), False)  # type: ignore[union-attr]
        build.started = time.monotonic()
        self.built += 1
        log.info("environment %s: installing %s with %s into %s", build.key, build.declared.shown,
                 self.config.predictors.installer, dest)

    # -- the master's loop ----------------------------------------------------------------------------------------
    def fds(self) -> dict[int, str]:
        return {b.process.stdout.fileno(): k for k, b in self.builds.items()
                if b.process is not None and b.process.stdout is not None}

    def read(self, key: str) -> None:
        """A builder's output is readable: keep it, or at its end, judge the build."""
        build = self.builds[key]
        assert build.process is not None and build.process.stdout is not None
        try:
            data = build.process.stdout.read()
        except BlockingIOError:
            return
        if data:
            build.chunks.append(data)
            return
        try:
            build.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill(build)
        outcome: dict[str, Any] = {}
        for line in reversed(b"".join(build.chunks).decode(errors="replace").splitlines()):
            if line.startswith("{"):
                try:
                    outcome = json.loads(line)
                    break
                except json.JSONDecodeError:
                    pass
        if outcome.get("ok"):
            self.finish(key, None, f"built in {outcome.get('seconds', 0):.1f}s")
        else:
            said = outcome.get("error") or f"the builder exited with status {build.process.returncode}"
            self.finish(key, Problem(f"installing its requirements ({build.declared.shown}) failed: {said}",
                                     str(build.declared.file) if build.declared.file else None, kind="install"))

    def expire(self, now: float) -> None:
        """A build past [predictors] install_timeout is killed, and fails."""
        limit = self.config.predictors.install_timeout
        for key, build in list(self.builds.items()):
            if build.process is not None and now - build.started > limit:
                self.kill(build)
                shutil.rmtree(self.root / key, ignore_errors=True)
                self.finish(key, Problem(f"installing its requirements ({build.declared.shown}) took longer than "
                                         f"[predictors] install_timeout ({limit:g}s)", kind="install"))

    @staticmethod
    def kill(build: Build) -> None:
        if build.process is not None and build.process.poll() is None:
            try:
                os.killpg(build.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            build.process.wait()

    def finish(self, key: str, problem: Problem | None, how: str = "") -> None:
        build = self.builds.pop(key)
        if build.process is not None and build.process.stdout is not None:
            build.process.stdout.close()
        (self.root / f"{key}.spec.json").unlink(missing_ok=True)
        if problem is None:
            log.info("environment %s: %s%s", key, how, self.fresh_note(self.add(key)))
        else:
            self.failed[key] = problem
            log.error("environment %s: %s", key, problem.message)
        self.done.append((key, problem))
        self.start_waiting()

    def take_done(self) -> list[tuple[str, Problem | None]]:
        done, self.done = self.done, []
        return done

    def status(self, key: str, now: float) -> dict[str, Any]:
        """An environment as GET /NAME shows it: its phase, how long it has taken, the installer's last line."""
        info, build = self.ready.get(key), self.builds.get(key)
        out: dict[str, Any] = {"key": key, "path": str(self.root / key), "installer": self.config.predictors.installer}
        if info is not None:
            out.update(phase="ready", fresh_interpreter=info.fresh, own_modules=list(info.conflicts))
        elif build is not None and build.process is None:
            out.update(phase="waiting", elapsed=round(now - build.queued, 1))
        elif build is not None:
            out.update(phase="building", elapsed=round(now - build.started, 1), last_line=self.last_line(key))
        elif key in self.failed:
            out.update(phase="failed", error=self.failed[key].message)
        return out

    def last_line(self, key: str) -> str:
        """The last line the installer wrote (bounded: the log's tail only)."""
        try:
            with open(self.root / key / envs.LOG, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL))
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][:200] if lines else ""

    def describe(self, key: str, now: float) -> str:
        """One line for an API whose version waits for its environment."""
        s = self.status(key, now)
        if s.get("phase") == "waiting":
            return (f"waiting to install its requirements ({self.config.predictors.max_installs} installs run at "
                    "once: [predictors] max_installs)")
        line = f": {s['last_line']}" if s.get("last_line") else ""
        return f"installing its requirements with {s['installer']} ({s.get('elapsed', 0):.0f}s){line}"

    def prune(self, in_use: set[str], now: float) -> None:
        """Remove the environments no version has needed for [predictors] env_grace seconds (in a thread: a big
        one takes a while to delete)."""
        try:
            entries = [e for e in os.listdir(self.root) if (self.root / e).is_dir()]
        except OSError:
            return
        for key in entries:
            if key in in_use or key in self.builds:
                self.unused_since.pop(key, None)
                continue
            since = self.unused_since.setdefault(key, now)
            if now - since >= self.config.predictors.env_grace:
                self.unused_since.pop(key, None)
                self.ready.pop(key, None)
                self.failed.pop(key, None)
                log.info("environment %s: no version has needed it for %gs; removing it", key, now - since)
                threading.Thread(target=self.remove, args=(key,), daemon=True).start()

    def remove(self, key: str) -> None:
        """Delete an environment, under its builder's lock (a builder of the same key waits for it)."""
        with open(self.root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (self.root / key / envs.READY).unlink(missing_ok=True)  # first: a half-removed one is never reused
            shutil.rmtree(self.root / key, ignore_errors=True)

    def stop(self) -> None:
        for build in self.builds.values():
            self.kill(build)
