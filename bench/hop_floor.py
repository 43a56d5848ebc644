"""The floor under any process hop on this machine: a 64-byte ping-pong over a Unix socket pair, blocking calls,
no event loop, no framing. What predictord's hop costs beyond bare starlette cannot go below this (less what
coalescing shares between requests under load).

    .venv/bin/python bench/hop_floor.py [--trips 20000]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trips", type=int, default=20000)
    trips = ap.parse_args().trips
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        for _ in range(trips):
            b.sendall(b.recv(64))
        os._exit(0)
    b.close()
    message = b"x" * 64
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for _ in range(trips):
        a.sendall(message)
        a.recv(64)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.waitpid(pid, 0)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / trips * 1e6
    theirs = (child.ru_utime + child.ru_stime) / trips * 1e6
    print(f"round trip {elapsed / trips * 1e6:.1f} us; CPU per round trip {mine + theirs:.1f} us "
          f"(this side {mine:.1f}, the other {theirs:.1f})")


if __name__ == "__main__":
    main()
