"""`predictord ray`: the predictors directory served by Ray Serve across a cluster (pip install 'predictord[ray]').

Only the ``predictord ray`` command and `predictord status --ray` import this package; the single-host daemon never
does, and never imports ray."""

from __future__ import annotations

import os

from ..config import is_loopback


def before_ray(address: str | None) -> None:
    """Call before anything imports ray. Ray turns a loopback address into the machine's own before it connects
    (and decides so when it is imported); a cluster on loopback (a laptop's, the tests') is reached only as itself."""
    if address is not None and is_loopback(address.rpartition(":")[0] or address):  # not "auto" on a real head
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
