"""The HTTP worker: uvicorn-worker's UvicornWorker, with uvloop and httptools when installed."""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker


class HttpWorker(UvicornWorker):  # type: ignore[misc]
    """A gunicorn worker running the ASGI front under uvicorn."""

    CONFIG_KWARGS: dict[str, Any] = {"loop": "auto", "http": "auto", "lifespan": "on", "server_header": False}
