"""systemd's notify protocol, spoken by the master itself.

gunicorn says READY=1 as soon as it listens, before any model is loaded, and nothing on reload or stop; so the
daemon takes NOTIFY_SOCKET out of the environment before gunicorn starts (children must not speak for it either)
and sends READY, RELOADING, STOPPING, STATUS and WATCHDOG itself.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Datagrams to $NOTIFY_SOCKET; a no-op when the daemon was not started by systemd."""

    def __init__(self, address: str | None, watchdog_usec: str | None = None) -> None:
        self.address = address
        self.watchdog_interval = int(watchdog_usec) / 1e6 / 2 if watchdog_usec and watchdog_usec.isdigit() else None
        self.last_watchdog = 0.0
        self.last_status = ""
        self.ready = False

    @classmethod
    def from_environment(cls) -> Notifier:
        """Take NOTIFY_SOCKET (and the watchdog settings) out of the environment, for the master alone."""
        address = os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", None)
        pid = os.environ.pop("WATCHDOG_PID", None)
        if pid is not None and pid.isdigit() and int(pid) != os.getpid():
            usec = None  # the watchdog is meant for another process
        return cls(address, usec)

    def send(self, message: str) -> bool:
        if not self.address:
            return False
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message.encode(), address)
            return True
        except OSError:
            return False  # systemd went away; nothing to tell

    def status(self, text: str) -> None:
        if text != self.last_status:
            self.last_status = text
            self.send(f"STATUS={text}")

    def set_ready(self, text: str) -> None:
        if not self.ready:
            self.ready = True
            self.last_status = text
            self.send(f"READY=1\nSTATUS={text}\nMAINPID={os.getpid()}")

    def reloading(self) -> None:
        self.ready = False
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=stopping: draining in-flight requests")

    def watchdog(self) -> None:
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self.last_watchdog >= self.watchdog_interval:
            self.last_watchdog = now
            self.send("WATCHDOG=1")
