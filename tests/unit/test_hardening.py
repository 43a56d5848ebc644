"""The pieces that keep hostile input bounded, in-process: the metrics reader that survives half-written files,
the bounded lines of predictor output, escaped control characters, and the children a version started."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from predictord import metrics
from predictord.logs import SafeFormatter, shown
from predictord.master.history import read_snapshot
from predictord.model.children import Children
from predictord.model.output import MAX_LINE, Lines


@pytest.fixture
def multiproc(tmp_path: Path) -> Path:
    directory = tmp_path / "metrics"
    before = os.environ.get(metrics.ENV)
    metrics.prepare(directory)
    yield directory
    if before is None:
        os.environ.pop(metrics.ENV, None)
    else:
        os.environ[metrics.ENV] = before


def test_a_metrics_file_that_is_empty_or_half_written_is_left_out_not_fatal(multiproc: Path) -> None:
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    good = MmapedDict(str(multiproc / "counter_1.db"))  # a process's file, as prometheus-client writes it
    labels = ["api", "class", "code"]
    good.write_value(mmap_key("predictord_requests_total", "predictord_requests_total", labels, ["a", "2xx", "200"],
                              ""), 3.0, 0.0)
    good.close()
    (multiproc / "counter_999.db").write_bytes(b"")  # just created by a process, not yet written
    head = (multiproc / "counter_1.db").read_bytes()[:30]
    (multiproc / "counter_998.db").write_bytes(head + b"\xff" * 10)  # caught mid-write
    snap = read_snapshot()
    assert snap.requests == {"a": {"200": 3.0}}, "the readable file counts, the others are left out"
    assert "predictord_requests_total" in metrics.exposition(lambda: []).decode()


def test_lines_are_split_bounded_and_say_what_was_cut() -> None:
    out: list[str] = []
    lines = Lines(out.append)
    lines.write("one\ntw")
    lines.write("o\n" + "x" * (MAX_LINE + 500) + "\nlast")
    assert out[:2] == ["one", "two"]
    assert out[2] == "x" * MAX_LINE + "... (500 more characters)"
    lines.flush()
    assert out[3] == "last"


def test_control_characters_are_escaped_in_log_messages() -> None:
    assert shown("bad\nname\x1b[2J\t") == "bad\\nname\\x1b[2J\t"
    record = logging.LogRecord("x", logging.ERROR, "f", 1, "API %s refused", ("evil\nINFO forged line",), None)
    line = SafeFormatter("%(message)s").format(record)
    assert line == "API evil\\nINFO forged line refused" and "\n" not in line


def test_the_processes_a_version_starts_end_with_it_and_no_other_versions() -> None:
    owner: list[str | None] = [None]
    children = Children(lambda: owner[0])
    hook = [children.audit]
    sys.addaudithook(lambda event, args: hook[0](event, args))  # audit hooks stay for the process: this one goes idle
    try:
        owner[0] = "a@1"
        mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        owner[0] = "b@1"
        theirs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        owner[0] = None
        children.look()
        assert children.owners[mine.pid] == "a@1" and children.owners[theirs.pid] == "b@1"
        assert children.end("a@1") == 1
        mine.wait(10)
        assert theirs.poll() is None, "another version's process lives on"
        assert children.end_all() == 1
        theirs.wait(10)
    finally:
        hook[0] = lambda event, args: None
        for p in (mine, theirs):
            if p.poll() is None:
                p.kill()
                p.wait()
