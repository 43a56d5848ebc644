from __future__ import annotations

import os
from pathlib import Path

from predictord.master.watcher import PredictorWatcher, api_of, fingerprint


def test_paths_map_to_apis(tmp_path: Path) -> None:
    for path, name in [("a.py", "a"), ("a.toml", "a"), ("m/predictor.py", "m"), ("m/w/x.bin", "m"), ("m", "m"),
                       (".a.py.tmp", None), ("a.py~", None), ("m/__pycache__/x.pyc", None), ("notes.txt", None),
                       ("m/.swp", None)]:
        assert api_of(tmp_path, str(tmp_path / path)) == name, path
    assert api_of(tmp_path, "/elsewhere/a.py") is None


def watcher(tmp_path: Path, woken: list[int]) -> PredictorWatcher:
    return PredictorWatcher(tmp_path, 1.0, lambda: woken.append(1))


def test_settles_after_quiet_and_two_equal_looks(tmp_path: Path) -> None:
    woken: list[int] = []
    w = watcher(tmp_path, woken)
    (tmp_path / "a.py").write_text("x")
    w.touch(str(tmp_path / "a.py"))
    w.touch(str(tmp_path / "a.py"))
    assert woken == [1], "only the first event of a burst wakes the master"
    t0 = w._pending["a"]
    assert w.step(t0 + 0.2) == set()  # too early to look
    assert w.step(t0 + 0.6) == set()  # first look
    assert w.step(t0 + 0.9) == set()  # quiet period not over
    assert w.step(t0 + 1.2) == {"a"}  # second look agrees
    assert w.step(t0 + 5) == set() and w.next_due() is None


def test_files_still_changing_are_not_handed_back(tmp_path: Path) -> None:
    w = watcher(tmp_path, [])
    f = tmp_path / "big"
    f.mkdir()
    (f / "predictor.py").write_text("")
    (f / "w.bin").write_bytes(b"x" * 10)
    w.touch(str(f / "w.bin"))
    t0 = w._pending["big"]
    assert w.step(t0 + 0.6) == set()
    (f / "w.bin").write_bytes(b"x" * 20)  # grew with no event seen (say, a missed inotify event)
    os.utime(f / "w.bin", ns=(1, 1))
    assert w.step(t0 + 1.2) == set(), "the two looks differ: look again"
    assert w.step(t0 + 1.8) == {"big"}


def test_a_delete_is_final_only_after_the_quiet_period(tmp_path: Path) -> None:
    w = watcher(tmp_path, [])
    (tmp_path / "a.py").write_text("x")
    os.remove(tmp_path / "a.py")
    w.touch(str(tmp_path / "a.py"))
    t0 = w._pending["a"]
    assert w.step(t0 + 0.6) == set()
    (tmp_path / "a.py").write_text("y")  # vim writes the file back
    w.touch(str(tmp_path / "a.py"))
    t1 = w._pending["a"]
    assert w.step(t1 + 0.6) == set() and w.step(t1 + 1.1) == {"a"}


def test_a_folder_that_is_no_predictor_is_never_walked(tmp_path: Path) -> None:
    """A link to a big or changing tree (rootlink -> /) is not looked into: it holds no predictor.py."""
    (tmp_path / "rootlink").symlink_to("/")
    assert fingerprint(tmp_path, "rootlink") == ()
