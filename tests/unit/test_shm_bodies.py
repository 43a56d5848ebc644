"""Large bodies through /dev/shm (bodies.py), in-process: written in chunks or pickled, read back exact, files
reused after an answer, removed when idle or left behind."""

from __future__ import annotations

import os
import time

import pytest

from predictord import bodies
from predictord.bodies import Pool, read_body, remove_left, unpickle_body

pytestmark = pytest.mark.skipif(not bodies.available(), reason="no writable /dev/shm here")
MASTER = 10_000_000 + os.getpid()  # a pid no daemon has: the files are this test's


def test_a_body_written_in_chunks_reads_back_exactly_and_its_file_is_reused() -> None:
    pool = Pool(MASTER, 3)
    first = pool.take()
    for chunk in (b"a" * 70_000, b"b" * 30_000):
        first.write(chunk)
    assert read_body(first.ref) == b"a" * 70_000 + b"b" * 30_000
    pool.give(first)
    second = pool.take()
    assert second is first, "an answered body's file serves the next one (no fresh pages to zero)"
    second.write(b"short")
    assert read_body(second.ref) == b"short", "only this body's length is read, not the file's"
    second.dump({"text": "x" * 100_000, "n": [1, 2]})
    assert unpickle_body(second.ref) == {"text": "x" * 100_000, "n": [1, 2]}
    pool.give(second)
    pool.trim(time.monotonic() + bodies.KEEP_IDLE + 1)
    assert not pool.idle and not second.path.exists(), "idle files go"


def test_what_an_http_worker_left_is_removed_by_the_master() -> None:
    pool = Pool(MASTER, 4)
    body = pool.take()
    body.write(b"x")
    assert body.path.exists()
    assert remove_left(MASTER, 4) == 1 and not body.path.exists()
    with pytest.raises(FileNotFoundError):
        read_body(body.ref)


def test_a_reference_outside_the_daemons_files_is_refused() -> None:
    for ref in ("../etc/passwd:10", "predictord-1-1-1/../../etc/passwd:3", "other-1:5", "predictord-1-1-1:x"):
        with pytest.raises(ValueError, match="not a shared body"):
            read_body(ref)
