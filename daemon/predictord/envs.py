"""Environments for predictors that declare requirements: building one, and using one in a process.

An environment is a venv (without pip of its own) under the envs directory, named by the key of what it holds
(``requirements.key``). A ``.pth`` file layers the daemon's own packages under the venv's, so torch and the rest
are shared unless the requirements ask for another version: pip, run by the environment's Python, sees the daemon's
packages as installed and installs only what is missing or pinned otherwise, into the environment alone.

Run as ``python -m predictord.envs SPEC.json``: builds the environment the spec describes (under a lock, so two
builders of one key build it once), writes the installer's output to ``install.log`` in it, and prints one JSON
line: ``{"ok": true, "seconds": ...}`` or ``{"ok": false, "error": "the package and the reason"}``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import time
import venv
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import Config
from .requirements import Declared

READY = ".ready"  # written last: an environment without it is half built (a builder died) and is built again
INFO = "env.json"
LOG = "install.log"
BASE_PTH = "_predictord_base.pth"


def site_packages(env: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))


def python_of(env: Path) -> Path:
    return env / "bin" / "python"


def base_paths() -> list[str]:
    """The daemon's own package folders (its venv's site-packages, PYTHONPATH), in order: what an environment
    layers under its own packages. The standard library and the working directory are not among them."""
    stdlib = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib")}
    out = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry) or entry in out:
            continue
        if entry in stdlib or entry.endswith(("lib-dynload", ".zip")) or not os.path.isabs(entry):
            continue
        out.append(entry)
    return out


def base_fingerprint() -> str:
    """What decides which packages an environment needs besides its requirements: the daemon's Python and the
    distributions its own packages hold (an upgrade of the daemon builds environments anew)."""
    dists = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions(path=base_paths())
                    if d.metadata["Name"]})
    return f"{sys.version}\0{sys.prefix}\0" + "\0".join(dists)


def key_context(config: Config) -> tuple[str, ...]:
    """Besides the requirements, what decides an environment's contents: the daemon's Python and packages, the
    installer and where it installs from."""
    p = config.predictors
    return base_fingerprint(), p.installer, p.index_url, "\0".join(config.find_links), str(p.no_index)


def spec_for(config: Config, key: str, declared: Declared, dest: Path) -> dict[str, Any]:
    """What a builder needs to build one environment (written to a file for ``python -m predictord.envs``)."""
    p = config.predictors
    return {"dest": str(dest), "key": key, "installer": p.installer, "index_url": p.index_url,
            "find_links": list(config.find_links), "no_index": p.no_index, "base_paths": base_paths(),
            "args": declared.installer_args(), "cwd": str(declared.file.parent) if declared.file else ""}


def is_ready(env: Path) -> bool:
    return (env / READY).is_file()


@dataclass(frozen=True)
class EnvInfo:
    """A built environment: where it is, and whether a worker must start from a fresh interpreter because it holds
    another version of a module the master has imported (``conflicts``)."""

    key: str
    path: Path
    conflicts: tuple[str, ...] = ()

    @property
    def python(self) -> Path:
        return python_of(self.path)

    @property
    def fresh(self) -> bool:
        return bool(self.conflicts)


def top_level_modules(env: Path) -> set[str]:
    """The importable top-level names an environment's own site-packages provides."""
    names: set[str] = set()
    try:
        entries = os.listdir(site_packages(env))
    except OSError:
        return names
    for entry in entries:
        if entry.endswith((".dist-info", ".egg-info", ".pth")) or entry.startswith(("_predictord", "__pycache__")):
            continue
        names.add(entry.split(".")[0])
    return names


def inspect(key: str, env: Path, loaded: set[str]) -> EnvInfo:
    """A built environment, and what of it clashes with the top-level modules already imported (``loaded``)."""
    return EnvInfo(key, env, tuple(sorted(top_level_modules(env) & loaded)))


def activate(env: Path) -> None:
    """Put an environment's packages first in this (forked) process: its site-packages (and its ``.pth`` files)
    ahead of the daemon's, and its ``bin`` first on PATH for the processes a predictor starts."""
    before = list(sys.path)
    site.addsitedir(str(site_packages(env)))
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before
    os.environ["VIRTUAL_ENV"] = str(env)
    os.environ["PATH"] = f"{env / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"


def child_environ(env: Path) -> dict[str, str]:
    """The environment variables of a process that runs an environment's Python: the environment's packages first
    (PYTHONPATH would put the daemon's ahead of them; the layering .pth brings them in after)."""
    out = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out["VIRTUAL_ENV"] = str(env)
    out["PATH"] = f"{env / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return out


# -- building (in the builder process) ----------------------------------------------------------------------------
def installer_command(spec: dict[str, Any], env: Path) -> list[str]:
    """The install command for a spec: pip run by the environment's Python, or uv aimed at it."""
    index: list[str] = []
    if spec.get("index_url"):
        index += ["--index-url", spec["index_url"]]
    for link in spec.get("find_links", ()):
        index += ["--find-links", link]
    if spec.get("no_index"):
        index.append("--no-index")
    if spec["installer"] == "uv":
        return [uv_binary(), "pip", "install", "--python", str(python_of(env)), *index, *spec["args"]]
    return [str(python_of(env)), "-s", "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--no-warn-script-location", "--no-warn-conflicts", *index, *spec["args"]]


def uv_binary() -> str:
    """uv's binary: the ``uv`` package's (pip install 'predictord[uv]'), else one on PATH."""
    try:
        import uv  # type: ignore[import-not-found,unused-ignore]  # an optional extra

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise FileNotFoundError("[predictors] installer = \"uv\", but uv is not installed: pip install "
                                    "'predictord[uv]', or set installer = \"pip\"") from None
        return found


def failure(log_text: str) -> str:
    """The installer's error, short: pip's and uv's ERROR/error lines (the package and the reason), else the last
    line it printed."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    errors = [re.sub(r"^(ERROR|error):\s*", "", line) for line in lines if re.match(r"^(ERROR|error):", line)]
    causes = [line.removeprefix("cause:").strip() for line in lines if line.startswith(("cause:", "╰─▶"))]
    said = errors[-2:] + causes[:1] if errors else lines[-1:]
    text = "; ".join(dict.fromkeys(said)) or "the installer failed without a word"
    return text if len(text) <= 400 else text[:400] + "..."


def build(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the environment of ``spec`` (see the module's docstring); reuse it when another builder made it."""
    env = Path(spec["dest"])
    env.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(env.parent / f"{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(env):
            return {"ok": True, "seconds": 0.0, "reused": True}
        if env.exists():
            shutil.rmtree(env)  # half built by a builder that died
        venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(env)
        lines = [f"import site; site.addsitedir({p!r})" for p in spec["base_paths"]]
        (site_packages(env) / BASE_PTH).write_text("\n".join(lines) + "\n")
        command = installer_command(spec, env)
        with open(env / LOG, "wb") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=spec.get("cwd") or None, env=child_environ(env))
        if code != 0:
            error = failure((env / LOG).read_text(errors="replace"))
            shutil.rmtree(env, ignore_errors=True)
            return {"ok": False, "error": error}
        seconds = round(time.monotonic() - started, 2)
        (env / INFO).write_text(json.dumps({"key": spec["key"], "installer": spec["installer"], "args": spec["args"],
                                            "seconds": seconds, "built_at": time.time()}))
        (env / READY).touch()
        return {"ok": True, "seconds": seconds}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        result = build(spec)
    except (OSError, subprocess.SubprocessError) as e:
        result = {"ok": False, "error": f"building the environment failed: {e}"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
