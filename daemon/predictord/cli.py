"""The ``predictord`` command: serve (the default), check PATH, status, options."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, logs
from .config import Config, ConfigError, describe_options, find_config, load_config, override
from .logs import shown

COMMANDS = ("serve", "check", "status", "options", "ray")
VALUED = ("--config", "--host", "--port", "--predictors", "--log-level", "--timeout", "--address",
          "--replica-cpus")  # options that take a value


def _load(args: argparse.Namespace) -> Config:
    config = load_config(find_config(args.config))
    config = override(config, "server", host=args.host, port=args.port, log_level=args.log_level)
    if args.predictors is not None:
        # Absolute, its links kept: the daemon follows a link to the release it points to now.
        config = override(config, "predictors", dir=os.path.abspath(args.predictors))
    return config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predictord", description="Serve Python predictors over HTTP on one machine.")
    p.add_argument("--version", action="version", version=f"predictord {__version__}")
    sub = p.add_subparsers(dest="command")
    helps = {"serve": "run the daemon (default)", "status": "show the running daemon",
             "ray": "serve the predictors directory on a Ray Serve cluster (pip install 'predictord[ray]')"}
    for name in ("serve", "status", "ray"):
        s = sub.add_parser(name, help=helps[name])
        s.add_argument("--config", help="config file (default: $PREDICTORD_CONFIG, /etc/predictord/config.toml, "
                                        "./config.toml)")
        s.add_argument("--host", help="override [server] host")
        s.add_argument("--port", type=int, help="override [server] port")
        s.add_argument("--predictors", help="override [predictors] dir")
        s.add_argument("--log-level", help="override [server] log_level")
        if name == "status":
            s.add_argument("--json", action="store_true", help="print the raw JSON")
            s.add_argument("--ray", action="store_true", help="the Ray Serve deployment of `predictord ray`")
        if name in ("status", "ray"):
            s.add_argument("--address", help="the Ray cluster (default: $RAY_ADDRESS, or the local one)")
        if name == "ray":
            s.add_argument("--replica-cpus", type=float, default=1.0,
                           help="CPUs Ray reserves for each replica (default 1)")
    c = sub.add_parser("check", help="load a predictor in a throwaway process (in its environment, built first "
                                     "when it declares requirements) and report every problem")
    c.add_argument("path", help="NAME.py or a NAME/ folder")
    c.add_argument("--timeout", type=float, default=120.0, help="load deadline in seconds (default 120)")
    c.add_argument("--config", help="config file: where environments are built, and from which index")
    sub.add_parser("options", help="print every config option with its default (Markdown)")
    return p


def check(path: str, timeout: float, config_path: str | None) -> int:
    """Check one predictor (a file, or a folder with predictor.py), or every one in a predictors directory."""
    from .sources import FOLDER_ENTRY

    target = Path(path)
    if not target.exists():
        print(f"{path}: no such file or folder", file=sys.stderr)
        return 1
    if target.is_dir() and not os.path.lexists(target / FOLDER_ENTRY):
        return check_directory(target, timeout, config_path)
    return check_one(target, timeout, config_path)


def check_directory(directory: Path, timeout: float, config_path: str | None) -> int:
    """Every API of a predictors directory (a release, before it is deployed), one after another, as the daemon
    would find them: names, two sources for one name, then each predictor's check. 1 if any would be refused."""
    from .sources import FOLDER_ENTRY, name_problem, scan

    found = scan(directory)
    for note in found.notes.values():
        print(f"note: {note}", file=sys.stderr)
    failed = []
    for name, (file, folder) in sorted(found.clashes.items()):
        print(f"{file}: two sources for API {name!r}: {file} and the folder {folder}/; the daemon serves neither",
              file=sys.stderr)
        failed.append(name)
    for name, source in sorted(found.apis.items()):
        problem = name_problem(name)
        if problem:
            print(f"{source.folder or source.code}: {problem}", file=sys.stderr)
        if problem or check_one(source.folder or source.code, timeout, config_path):
            failed.append(name)
    count = len(found.apis) + len(found.clashes)
    if not count:
        print(f"{directory}: no predictor in it (NAME.py, or NAME/ with {FOLDER_ENTRY})", file=sys.stderr)
        return 1
    summary = f"{directory}: {count} API{'s' if count > 1 else ''} checked, {count - len(failed)} OK"
    print(f"{summary}, {len(failed)} failed: {', '.join(sorted(failed))}" if failed else summary,
          file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def check_one(target: Path, timeout: float, config_path: str | None) -> int:
    from . import probe

    path = str(target)
    try:
        env = environment_for_check(target, config_path)
    except (ConfigError, ValueError) as problem:
        print(f"{path}: {problem}", file=sys.stderr)
        return 1
    result = probe.run(target, init=True, timeout=timeout, env=env)
    if result["ok"]:
        sig = result["signature"]
        extras = f", post_predict({', '.join(sig['post_predict'])})" if sig["post_predict"] is not None else ""
        kind = "async " if sig["async"] else ""
        print(f"{path}: OK: API {result['name']!r}: __init__({', '.join(sig['init'])}), "
              f"{kind}predict({', '.join(sig['predict'])}){extras}; loaded in {result['seconds']:.2f}s")
        return 0
    e = result["error"]
    where = f"{e['file']}:{e['line']}" if e.get("line") else e.get("file") or path
    print(f"{where}: {e['message']}", file=sys.stderr)
    return 1


def environment_for_check(target: Path, config_path: str | None) -> Path | None:
    """The environment a predictor that declares requirements is checked in: built (or reused) now, where the
    config builds them ([predictors] envs_dir; without one, a folder of this user's in /tmp); None: it needs none.
    ValueError with the installer's error when the install fails."""
    import tempfile

    from . import envs, requirements
    from .config import load_api_settings
    from .sources import source_for

    source = source_for(target)
    try:
        lines = load_api_settings(source.settings).dependencies.pip
    except ConfigError:
        return None  # the probe reports the settings file's error
    declared = requirements.declared(source.folder, lines, source.settings)
    if declared is None:
        return None
    config = load_config(find_config(config_path))
    scratch = Path(tempfile.gettempdir()) / f"predictord-check-{os.geteuid()}"
    root = config.envs_dir(scratch)
    key = requirements.key(declared, *envs.key_context(config))
    print(f"{target}: installing {declared.shown} with {config.predictors.installer} into {root / key}",
          file=sys.stderr)
    outcome = envs.build(envs.spec_for(config, key, declared, root / key))
    if not outcome["ok"]:
        raise ValueError(f"installing its requirements ({declared.shown}) failed: {outcome['error']}")
    return root / key


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    rows = [tuple(shown(c) for c in r) for r in rows]  # names and messages come from files: no control characters
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket, from the standard library (the installed daemon has no HTTP client library)."""

    def __init__(self, path: Path) -> None:
        super().__init__("predictord", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


def _get_unix(path: Path, target: str) -> bytes:
    conn = _UnixConnection(path)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        if response.status != 200:
            raise http.client.HTTPException(f"{target} answered {response.status}")
        return response.read()
    finally:
        conn.close()


def last_error(api: dict[str, Any]) -> str:
    """The newest of an API's load error, crash and request-time error, as ``file:line: message``."""
    found = [e for e in (api.get("error"), api.get("crash"), api.get("request_error"), api.get("health")) if e]
    if not found:
        return str(api.get("check") or "")
    e = max(found, key=lambda e: e.get("at") or 0)
    where = f"{e['file']}:{e['line']}: " if e.get("file") and e.get("line") else f"{e['file']}: " if e.get("file") \
        else ""
    count = api.get("request_errors", 0) if e is api.get("request_error") else 0
    return where + str(e.get("message", "")) + (f" ({count} since start)" if count > 1 else "")


def _dedicated(worker: dict[str, Any]) -> str:
    """How a worker of an API's own is marked: dedicated, in its own environment, from a fresh interpreter."""
    if not worker.get("dedicated"):
        return ""
    env = ", its own environment" if worker.get("env") else ""
    return f" (dedicated{env}{', a fresh interpreter' if worker.get('fresh') else ''})"


def _memory(device: dict[str, Any]) -> str:
    if device["kind"] == "gpu":
        return f"{device['memory_used'] / 2**30:.1f}/{device['memory_total'] / 2**30:.1f} GiB used"
    return f"{device['memory_available'] / 2**30:.1f}/{device['memory_total'] / 2**30:.1f} GiB available"


def status(config: Config, as_json: bool) -> int:
    """The running daemon's APIs, workers and recent events, read from its admin socket."""
    path = config.admin_socket
    try:
        data: dict[str, Any] = json.loads(_get_unix(path, "/admin/status"))
    except (OSError, http.client.HTTPException, ValueError) as e:
        print(f"cannot reach predictord's admin socket {path}: {e}; is it running (systemctl status predictord), "
              "and may you open the socket (sudo)?", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    now = time.time()
    rows = [("API", "STATE", "VERSION", "WHERE", "REQ/S", "P50", "P99", "ERRORS", "LAST ERROR")]
    for name, a in sorted(data["apis"].items()):
        where = ",".join(f"{r['device']}#{r['worker']}" for r in a["replicas"]) or "-"
        error = last_error(a)
        st = a.get("stats") or {}
        ms = [f"{st[k]:.1f}ms" if st.get(k) is not None else "-" for k in ("p50_ms", "p99_ms")]
        rows.append((name, a["state"], ",".join(a["version"]["serving"]) or a["version"]["wanted"] or "-", where,
                     f"{st.get('rps', 0):.1f}", *ms, str(st.get("errors", 0)), error))
    lines = _table(rows)
    lines += ["", *_table([("WORKER", "PID", "DEVICE", "UPTIME", "RESTARTS", "BUSY", "JOBS", "APIS")] + [
        (str(w["slot"]) + ("+" if w.get("added") else ""), str(w["pid"]), w["device"],
         _ago(now - w.get("started_at", now)), str(w.get("restarts", 0)),
         f"{w['busy']:.0%}" if w.get("busy") is not None else "-",
         str(w["jobs"]) if w.get("jobs") is not None else "-",
         (", ".join(sorted(w["apis"])) or "-") + _dedicated(w))
        for w in data["workers"] or []])]
    devices = data.get("devices") or []
    if devices:
        lines += ["", *_table([("DEVICE", "STATE", "UTIL", "MEMORY", "NOT OURS", "WORKERS")] + [
            (d["name"], d["state"], f"{d['util']:.0f}%", _memory(d),
             f"{d.get('foreign_util', 0):.0f}%, {d.get('foreign_memory', 0) / 2**30:.1f} GiB" if d["kind"] == "gpu"
             else "-", str(d["workers"])) for d in devices])]
    decisions = (data.get("decisions") or [])[-10:]
    if decisions:
        lines += ["", "REBALANCING"]
        lines += [f"{time.strftime('%H:%M:%S', time.localtime(e['at']))}  {shown(e['text'])}" for e in decisions]
    events = (data.get("events") or [])[-10:]
    if events:
        lines += ["", "RECENT EVENTS"]
        lines += [f"{time.strftime('%H:%M:%S', time.localtime(e['at']))}  {e['kind']:<8} {shown(e['text'])}"
                  for e in events]
    daemon = data.get("daemon") or {}
    if "pid" in daemon:
        lines += ["", f"daemon pid {daemon['pid']}, up {_ago(now - daemon['started_at'])}, serving "
                      f"{shown(daemon['predictors_dir'])}"]
    print("\n".join(line.rstrip() for line in lines))
    print("\nper-API figures are over the last minute; predictord status --json has everything")
    return 0


def command_first(argv: list[str]) -> list[str]:
    """The arguments with the subcommand first (``predictord --config X status`` is ``status --config X``), and
    ``serve`` when none is named."""
    i = 0
    while i < len(argv):
        if argv[i] in COMMANDS:
            return [argv[i], *argv[:i], *argv[i + 1:]]
        if argv[i] in ("-h", "--help", "--version"):
            return argv
        if not argv[i].startswith("-"):
            break
        i += 2 if argv[i] in VALUED else 1
    return ["serve", *argv]


def main(argv: list[str] | None = None) -> None:
    try:
        run(argv)
        sys.stdout.flush()  # here, not at exit, where a closed pipe would be "Exception ignored"
    except BrokenPipeError:  # `predictord status | head`: the reader has gone; no traceback (Python's recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def run(argv: list[str] | None) -> None:
    argv = command_first(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(argv)
    if args.command == "options":
        print(describe_options())
        return
    if args.command == "check":
        sys.exit(check(args.path, args.timeout, args.config))
    try:
        config = _load(args)
    except ConfigError as e:
        print(f"predictord: {e}", file=sys.stderr)
        sys.exit(2)
    if args.command in ("ray", "status") and (args.command == "ray" or args.ray):
        from .cluster import before_ray

        before_ray(args.address)
    if args.command == "status" and args.ray:
        from .cluster.registry import status as ray_status

        sys.exit(ray_status(args.address, args.json))
    if args.command == "status":
        sys.exit(status(config, args.json))
    if args.command == "ray":
        logs.setup(config.server.log_level, config.server.log_format)
        from .cluster.driver import main as ray_main

        sys.exit(ray_main(config, args.address, args.replica_cpus))
    from .master.app import serve

    serve(config, reload=lambda: _load(args))
