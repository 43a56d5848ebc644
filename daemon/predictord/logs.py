"""Logging: one event per line with level, pid and the process's role (master, http0, model1:gpu0).

Under systemd (JOURNAL_STREAM is set) a traceback is folded into its event's line, so journald stores one entry
per event; in a terminal it keeps its lines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys

FORMAT = "%(asctime)s %(levelname)s [%(process)d %(role)s] %(name)s: %(message)s"
_role = "master"
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def shown(text: object) -> str:
    """Text from outside (a file name, a predictor's message) made safe for a log line or a terminal: control
    characters (a newline that would forge a log line, an escape sequence that would clear a terminal) are
    written as escapes."""
    return _CONTROL.sub(lambda m: repr(m.group(0))[1:-1], str(text))


def set_role(role: str) -> None:
    """Name this process in every log line it writes from now on (call right after a fork)."""
    global _role
    _role = role


class RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


class SafeFormatter(logging.Formatter):
    """The daemon's text format: a message never holds a control character (see ``shown``); a traceback keeps its
    lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = shown(record.message)
        return super().formatMessage(record)


class OneLineFormatter(SafeFormatter):
    """Folds tracebacks into one line (for journald)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " \u23ce ")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, pid, role, logger, message, and the record's extra fields."""

    STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "role", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        event = {"time": self.formatTime(record), "level": record.levelname, "pid": record.process,
                 "role": getattr(record, "role", _role), "logger": record.name, "message": record.getMessage()}
        event.update({k: v for k, v in record.__dict__.items() if k not in self.STANDARD})
        if record.exc_info:
            event["traceback"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


_format = "text"


def formatter() -> logging.Formatter:
    if _format == "json":
        return JsonFormatter()
    return OneLineFormatter(FORMAT) if os.environ.get("JOURNAL_STREAM") else SafeFormatter(FORMAT)


def current_format() -> str:
    """The log format this process was set up with (text or json): a worker started by exec sets up the same."""
    return _format


def adopt(handler: logging.Handler) -> None:
    """Give a handler (ours or gunicorn's) the daemon's format and the role of the writing process."""
    handler.setFormatter(formatter())
    handler.addFilter(RoleFilter())


def setup(level: str, fmt: str = "text") -> None:
    global _format
    _format = fmt
    handler = logging.StreamHandler(sys.stderr)
    adopt(handler)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def redirect_handlers(stream: object) -> None:
    """Point the daemon's stream handlers (its own and gunicorn's) at ``stream`` (a model worker keeps the real
    stderr for its log while fds 1 and 2 lead into it)."""
    for name in ("", "gunicorn.error", "gunicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setStream(stream)
