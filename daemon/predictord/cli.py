"""The ``predictord`` command: serve (the default), check PATH, status, options."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config, ConfigError, describe_options, find_config, load_config, override

COMMANDS = ("serve", "check", "status", "options")


def _load(args: argparse.Namespace) -> Config:
    config = load_config(find_config(args.config))
    config = override(config, "server", host=args.host, port=args.port, log_level=args.log_level)
    if args.predictors is not None:
        config = override(config, "predictors", dir=str(Path(args.predictors).resolve()))
    return config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predictord", description="Serve Python predictors over HTTP on one machine.")
    p.add_argument("--version", action="version", version=f"predictord {__version__}")
    sub = p.add_subparsers(dest="command")
    for name in ("serve", "status"):
        s = sub.add_parser(name, help="run the daemon (default)" if name == "serve" else "show the running daemon")
        s.add_argument("--config", help="config file (default: $PREDICTORD_CONFIG, /etc/predictord/config.toml, "
                                        "./config.toml)")
        s.add_argument("--host", help="override [server] host")
        s.add_argument("--port", type=int, help="override [server] port")
        s.add_argument("--predictors", help="override [predictors] dir")
        s.add_argument("--log-level", help="override [server] log_level")
        if name == "status":
            s.add_argument("--json", action="store_true", help="print the raw JSON")
    c = sub.add_parser("check", help="load a predictor in a throwaway process and report every problem")
    c.add_argument("path", help="NAME.py or a NAME/ folder")
    c.add_argument("--timeout", type=float, default=120.0, help="load deadline in seconds (default 120)")
    sub.add_parser("options", help="print every config option with its default (Markdown)")
    return p


def check(path: str, timeout: float) -> int:
    from . import probe

    target = Path(path)
    if not target.exists():
        print(f"{path}: no such file or folder", file=sys.stderr)
        return 1
    result = probe.run(target, init=True, timeout=timeout)
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


def status(config: Config, as_json: bool) -> int:
    host = config.server.host if config.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{config.server.port}/"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            data: dict[str, Any] = json.load(r)
    except (urllib.error.URLError, OSError) as e:
        print(f"cannot reach predictord at {url}: {e}; is it running (systemctl status predictord)?",
              file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [("API", "STATE", "VERSION", "WHERE", "LAST ERROR")]
    for name, a in sorted(data["apis"].items()):
        where = ",".join(f"{r['device']}#{r['worker']}" for r in a["replicas"]) or "-"
        err = a.get("error") or {}
        error = f"{err['file']}:{err['line']}: {err['message']}" if err.get("line") else err.get("message", "")
        rows.append((name, a["state"], ",".join(a["version"]["serving"]) or a["version"]["wanted"], where, error))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
    print()
    print("WORKER  PID      DEVICE  APIS")
    for w in data["workers"]:
        print(f"{w['slot']:<7} {w['pid']:<8} {w['device']:<7} {', '.join(sorted(w['apis'])) or '-'}")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = _parser().parse_args(argv)
    if args.command == "options":
        print(describe_options())
        return
    if args.command == "check":
        sys.exit(check(args.path, args.timeout))
    try:
        config = _load(args)
    except ConfigError as e:
        print(f"predictord: {e}", file=sys.stderr)
        sys.exit(2)
    if args.command == "status":
        sys.exit(status(config, args.json))
    from .app import serve

    serve(config, reload=lambda: _load(args))
