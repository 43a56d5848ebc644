"""What the HTTP surface lets out: bearer tokens on its routes, and error text without the machine's secrets."""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass
from typing import Any

# An absolute path: a slash after a start, a space, a quote or a colon, then path characters.
# An absolute path starts a message or follows a space, quote, bracket, '=', ':' or ',' (not '<', so the "/b" of
# "</b>" in a predictor's own text is left alone).
_PATH = re.compile(r"(?:^|(?<=[\s'\"(\[=:,]))/[\w.@+~-]+(?:/[\w.@+~-]*)*")
OUTSIDE = "<a path outside the predictors directory>"
ENV_VALUE = "<an environment value>"
MIN_SECRET = 8  # shorter environment values ("C.UTF-8", "1", "en_US") are words, not secrets


@dataclass(frozen=True)
class Tokens:
    """The bearer tokens the routes ask for (None: that surface is open)."""

    predict: bytes | None = None
    admin: bytes | None = None


def authorized(headers: list[tuple[bytes, bytes]], token: bytes | None) -> bool:
    """The request carries ``Authorization: Bearer TOKEN`` (compared in constant time), or no token is asked for."""
    if token is None:
        return True
    for key, value in headers:
        if key == b"authorization":
            scheme, _, given = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)
    return False


def redact(message: str, predictors_dir: str) -> str:
    """Error text for clients: paths outside the predictors directory and environment values replaced."""
    inside = predictors_dir.rstrip("/") + "/"
    secrets = sorted((v for v in os.environ.values() if len(v) >= MIN_SECRET), key=len, reverse=True)
    parts: list[str] = []
    last = 0
    for m in _PATH.finditer(message):
        parts.append(_without(message[last:m.start()], secrets))
        found = m.group(0)
        parts.append(found if found.startswith(inside) or found == predictors_dir else OUTSIDE)
        last = m.end()
    parts.append(_without(message[last:], secrets))
    return "".join(parts)


def _without(text: str, secrets: list[str]) -> str:
    for value in secrets:
        if value in text:
            text = text.replace(value, ENV_VALUE)
    return text


def redact_status(status: dict[str, Any], predictors_dir: str) -> dict[str, Any]:
    """An API's status document with its error messages redacted (a copy; the routes table is left alone)."""
    out = status
    for key in ("error", "crash", "request_error", "health"):
        error = status.get(key)
        if error and isinstance(error.get("message"), str):
            out = {**out, key: {**error, "message": redact(error["message"], predictors_dir)}}
    return out
