"""What it costs to put a body into a /dev/shm file and take it out again: ``os.pwrite`` against a copy into a
mapping of the file (what ``bodies.SharedBody`` writes through), and ``os.pread`` against a slice of a fresh mapping
or of a mapping kept from one body to the next (the model worker's side: ``bodies.Reader`` keeps one), for a body of
--kb written in 256 KB chunks into a file that is reused, as the HTTP worker's pool reuses its files.

    .venv/bin/python bench/shm_copy.py [--kb 1024] [--times 2000] [--rounds 2]

Prints microseconds of process CPU per body.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time
from collections.abc import Callable

CHUNK = 256 * 1024


def per_body(times: int, one: Callable[[], object]) -> float:
    started = time.process_time()
    for _ in range(times):
        one()
    return (time.process_time() - started) / times * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kb", type=int, default=1024)
    ap.add_argument("--times", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    size = args.kb * 1024
    chunks = [os.urandom(min(CHUNK, size - at)) for at in range(0, size, CHUNK)]
    path = f"/dev/shm/predictord-bench-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))

        def pwrite() -> None:
            at = 0
            for chunk in chunks:
                os.pwrite(fd, chunk, at)
                at += len(chunk)

        def mapped() -> None:
            at = 0
            for chunk in chunks:
                mapping[at:at + len(chunk)] = chunk
                at += len(chunk)

        def pread() -> bytes:
            return os.pread(fd, size, 0)

        def fresh_mapping() -> bytes:
            reader = os.open(path, os.O_RDONLY)
            view = mmap.mmap(reader, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
            os.close(reader)
            data = view[:size]
            view.close()
            return data

        reader_fd = os.open(path, os.O_RDONLY)
        kept = mmap.mmap(reader_fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)

        def kept_mapping() -> bytes:
            return kept[:size]

        cases = {"write: os.pwrite": pwrite, "write: copy into a mapping": mapped, "read: os.pread": pread,
                 "read: a fresh mapping, sliced": fresh_mapping, "read: a kept mapping, sliced": kept_mapping}
        for r in range(1, args.rounds + 1):
            for label, one in cases.items():
                print(f"round {r}: {label}: {per_body(args.times, one):.0f} us of CPU per {args.kb} KB body",
                      flush=True)
        mapping.close()
        kept.close()
        os.close(reader_fd)
    finally:
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()
