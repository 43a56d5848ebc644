"""Large bodies through /dev/shm (bodies.py), in-process: written in chunks or pickled, read back exact, files
reused after an answer, removed when idle or left behind; a model worker's large answers lent through its files."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from predictord import bodies
from predictord.bodies import Pool, Reader, SharedBody, remove_left
from predictord.model.jobs import JobConnection, JobRunner
from predictord.scoreboard import RunMarks, Scoreboard

pytestmark = pytest.mark.skipif(not bodies.available(), reason="no writable /dev/shm here")
MASTER = 10_000_000 + os.getpid()  # a pid no daemon has: the files are this test's


def test_a_body_written_in_chunks_reads_back_exactly_and_its_file_is_reused() -> None:
    pool, reader = Pool(MASTER, 3), Reader()
    first = pool.take()
    for chunk in (b"a" * 70_000, b"b" * 30_000):
        first.write(chunk)
    assert reader.read(first.ref) == b"a" * 70_000 + b"b" * 30_000
    pool.give(first)
    second = pool.take()
    assert second is first, "an answered body's file serves the next one (no fresh pages to zero)"
    second.write(b"short")
    assert reader.read(second.ref) == b"short", "only this body's length is read, not the file's"
    second.dump({"text": "x" * 100_000, "n": [1, 2]})
    assert reader.unpickle(second.ref) == {"text": "x" * 100_000, "n": [1, 2]}
    assert len(reader.kept) == 1, "one mapping of the file, kept from body to body"
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
        Reader().read(body.ref)


def test_a_reference_outside_the_daemons_files_is_refused() -> None:
    for ref in ("../etc/passwd:10:1", "predictord-1-1-1/../../etc/passwd:3:1", "other-1:5:1", "predictord-1-1-1:x:1",
                "predictord-1-1-1:3", "predictord-1-1-1:3:x", "predictord-1-1-1:3:1:1"):
        with pytest.raises(ValueError, match="not a shared body"):
            Reader().read(ref)


def test_a_kept_mapping_follows_its_file_grown_replaced_or_removed() -> None:
    reader = Reader()
    pool = Pool(MASTER, 5)
    body = pool.take()
    body.write(b"a" * 70_000)
    assert reader.read(body.ref) == b"a" * 70_000
    mapped = reader.kept[body.name].mapping
    body.start()
    body.write(b"b" * 3_000_000)  # the file grows past the mapping: mapped afresh
    assert reader.read(body.ref) == b"b" * 3_000_000 and reader.kept[body.name].mapping is not mapped
    # A replacement HTTP worker of the same slot makes a file of the same name: never read through the old mapping
    # (the reference names the file's inode), and a reference to the old file is refused, not read from the new one.
    stale = body.ref
    body.remove()
    again = Pool(MASTER, 5).take()
    assert again.name == body.name and again.inode != body.inode
    again.write(b"c" * 70_000)
    assert reader.read(again.ref) == b"c" * 70_000
    for fresh in (reader, Reader()):
        with pytest.raises(ValueError, match="replaced"):
            fresh.read(stale)
    assert reader.read(again.ref) == b"c" * 70_000
    reader.sweep(time.monotonic())
    assert list(reader.kept) == [again.name], "its file is there: kept"
    again.remove()
    reader.sweep(time.monotonic())
    assert not reader.kept, "a removed file's mapping goes (it would keep the file's memory)"
    with pytest.raises(FileNotFoundError):
        reader.read(again.ref)


def test_idle_mappings_go_and_few_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodies, "KEEP_MAPPINGS", 2)
    reader, pool = Reader(), Pool(MASTER, 6)
    files = [pool.take() for _ in range(3)]
    try:
        for n, body in enumerate(files):
            body.write(bytes([n]) * 70_000)
            assert reader.read(body.ref) == bytes([n]) * 70_000
        assert list(reader.kept) == [files[1].name, files[2].name], "the least recently used went"
        reader.read(files[1].ref)
        reader.sweep(time.monotonic())
        assert list(reader.kept) == [files[2].name, files[1].name]
        reader.sweep(time.monotonic() + bodies.KEEP_IDLE + 1)
        assert not reader.kept, "idle mappings go"
    finally:
        for body in files:
            body.remove()


def test_a_model_worker_lends_large_answers_through_its_files_and_reuses_what_is_given_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.new_event_loop()
    runner = JobRunner({}, loop, lambda *_: None, RunMarks(Scoreboard(), 0), lambda *_: None)
    runner.share_answers, runner.answers = True, Pool(MASTER, "m1")
    one, two, reader = JobConnection(runner), JobConnection(runner), Reader()
    try:
        first = runner.lend(one, 1, b"a" * 100_000)
        second = runner.lend(two, 2, b"b" * 70_000)
        assert reader.read(first) == b"a" * 100_000 and reader.read(second) == b"b" * 70_000
        assert first.split(":")[0] != second.split(":")[0], "a lent file takes no other answer"
        runner.give_back(one, 1)
        third = runner.lend(two, 3, b"c" * 80_000)
        assert third.split(":")[0] == first.split(":")[0] and reader.read(third) == b"c" * 80_000, "given back: reused"
        runner.discard(two)  # its HTTP worker went away: what it had yet to read is the worker's again
        assert not runner.lent and len(runner.answers.idle) == 2

        def no_room(self: object, chunk: bytes) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(SharedBody, "write", no_room)
        assert runner.lend(one, 4, b"d" * 100_000) == "", "no room in /dev/shm: the answer goes in the frame"
        assert not runner.lent
    finally:
        remove_left(MASTER)
        loop.close()


def test_only_the_files_of_a_daemon_whose_lock_nobody_holds_are_swept() -> None:
    dead, live, unlocked = MASTER + 1, MASTER + 2, MASTER + 3
    dead_lock = bodies.hold(dead)
    live_lock = bodies.hold(live)
    assert dead_lock is not None and live_lock is not None
    for master in (dead, live, unlocked):
        Pool(master, 0).take().write(b"x")
    os.close(dead_lock)  # its processes are gone: the lock is free, the file stays (as after a SIGKILL)
    try:
        swept = bodies.sweep_dead()
        assert swept.get(dead) == 1 and not bodies.files_of(dead)
        assert not (bodies.ROOT / f"predictord-{dead}.lock").exists()
        assert live not in swept and len(bodies.files_of(live)) == 1, "held: a process of that daemon lives"
        assert unlocked not in swept and len(bodies.files_of(unlocked)) == 1, "no lock file: never touched"
    finally:
        bodies.let_go(live, live_lock)
        for master in (live, unlocked):
            remove_left(master)
    assert not (bodies.ROOT / f"predictord-{live}.lock").exists()
