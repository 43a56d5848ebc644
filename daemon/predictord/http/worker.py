"""The HTTP worker: uvicorn-worker's UvicornWorker, with uvloop, httptools bounded by guard.py, and a drain.

Stock uvicorn shutdown closes idle keep-alive connections at once, and a client that sent its next request on one
at that moment gets a connection error (0-3 failures per reload, measured). Draining first fixes it: stop
accepting, answer every request with ``Connection: close`` until the clients have closed their connections (or
``DRAIN_SECONDS`` pass), then shut down as usual.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import sys
import time
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from .. import metrics
from .guard import GuardedHttpProtocol

DRAIN_SECONDS = 3.0


class DrainingServer(Server):
    """uvicorn's Server with a drain before its shutdown."""

    def __init__(self, config: Any, app: Any) -> None:
        super().__init__(config)
        self.front = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        self.front.draining = True
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.server_state.connections and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        await super().shutdown(sockets=None)


class HttpWorker(UvicornWorker):  # type: ignore[misc]
    """A gunicorn worker running the ASGI front under uvicorn."""

    # proxy_headers off: nothing here reads the client's address, and a forwarded header should not rewrite it
    # (uvicorn's middleware cost a call per request for it).
    CONFIG_KWARGS: dict[str, Any] = {"loop": "auto", "http": "auto", "lifespan": "on", "server_header": False,
                                     "proxy_headers": False}

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        self.config.http = functools.partial(GuardedHttpProtocol, limits=self.wsgi.limits,
                                             on_refused=functools.partial(self.wsgi.count, metrics.NO_API, 503))
        server = DrainingServer(self.config, self.wsgi)
        self._install_sigquit_handler()
        # The sockets themselves, not gunicorn's wrappers: uvloop closes a listener's descriptor, then the socket
        # object, which it expects to fail (EBADF); a wrapper logged that, twice per worker at every stop.
        await server.serve(sockets=[listener.sock for listener in self.sockets])
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
