"""The reader follows its configured path to whatever directory it is now, stepped by hand (no thread, no sleep)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from predictord.master.reader import FOLLOW_EVERY, DirectoryReader

DEBOUNCE = 1.0
API = "class PythonPredictor:\n    def predict(self, payload):\n        return {}\n"


@pytest.fixture
def releases(tmp_path: Path) -> Path:
    for name in ("r1", "r2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.py").write_text(API)
    (tmp_path / "current").symlink_to("r1")
    return tmp_path


@pytest.fixture
def reader(releases: Path) -> Iterator[DirectoryReader]:
    reader = DirectoryReader(releases / "current", releases / "runtime", False, lambda: None)
    reader.watch(DEBOUNCE)
    yield reader
    reader.stop()


def swap(link: Path, target: str) -> None:
    os.symlink(target, link.with_name("next"))
    os.replace(link.with_name("next"), link)


def test_a_swapped_link_is_read_once_the_new_release_has_settled(releases: Path, reader: DirectoryReader) -> None:
    assert reader.directory == releases / "r1"
    assert not reader.follow(0.0, asked=False), "the same directory: nothing to read"
    swap(releases / "current", "r2")
    assert not reader.follow(0.5, asked=False), "too soon to look: a second between looks"
    assert not reader.follow(FOLLOW_EVERY, asked=False), "seen, not settled: read after two looks agree"
    assert reader.directory == releases / "r2" and reader.watcher is not None
    assert reader.watcher.directory == releases / "r2", "the new release is watched at once"
    (releases / "r2" / "b.py").write_text(API)  # still being copied in
    assert not reader.follow(FOLLOW_EVERY + DEBOUNCE / 2, asked=False), "it changed between looks"
    assert not reader.follow(FOLLOW_EVERY + DEBOUNCE * 0.9, asked=False)
    assert reader.follow(FOLLOW_EVERY + DEBOUNCE, asked=False), "two looks agree: read it whole"
    assert set(reader.read(None).apis) == {"a", "b"}
    assert not reader.follow(FOLLOW_EVERY + DEBOUNCE + 0.1, asked=False), "read once"


def test_a_path_that_leads_nowhere_changes_nothing_until_a_directory_is_there(
        releases: Path, reader: DirectoryReader, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "predictord.master")
    swap(releases / "current", "r3")
    for t in (1.0, 2.0, 3.0):
        assert not reader.follow(t, asked=False)
    assert reader.directory == releases / "r1", "the last directory stays the one served"
    assert caplog.text.count(f"is not there (it leads to {releases / 'r3'})") == 1, "said once"
    reader.follow(4.0, asked=True)  # a reading asked for meanwhile (SIGHUP) covers no API: none is dropped
    assert reader.read(set()).apis == {} and reader.read(set()).only == frozenset()
    (releases / "r3").mkdir()
    (releases / "r3" / "c.py").write_text(API)
    assert not reader.follow(5.0, asked=False)
    assert reader.follow(5.0 + DEBOUNCE / 2, asked=False)
    assert reader.directory == releases / "r3" and "is there again" in caplog.text
    assert set(reader.read(None).apis) == {"c"}


def test_a_reading_asked_for_reads_the_new_directory_at_once(releases: Path, reader: DirectoryReader) -> None:
    swap(releases / "current", "r2")
    (releases / "r2" / "b.py").write_text(API)
    assert not reader.follow(0.0, asked=True), "the caller reads it: nothing left to settle"
    assert reader.directory == releases / "r2"
    assert set(reader.read(None).apis) == {"a", "b"}
    assert not reader.follow(FOLLOW_EVERY + DEBOUNCE, asked=False)
