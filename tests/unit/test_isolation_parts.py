"""The master's side of API isolation, in-process: crash blame and quarantine, workers of an API's own, and a
name with two sources. No daemon, no worker process."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

from test_master_parts import api, parts  # noqa: F401 - the fixture

from predictord.config import ApiSettings, ServingConfig
from predictord.master.autopsy import Autopsy, examine, fault_frames
from predictord.master.placement import Want, WorkerSlot, place
from predictord.master.reader import DirectoryReader
from predictord.master.rebalance import ApiSample, Limits, Sample, WorkerSample, _Plan
from predictord.scoreboard import Scoreboard

FAULT = '''Fatal Python error: Segmentation fault

Thread 0x00007f1 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 324 in wait
  File "/usr/lib/python3.11/threading.py", line 622 in wait

Current thread 0x00007f2 (most recent call first):
  File "/usr/lib/python3.11/ctypes/__init__.py", line 519 in string_at
  File "/srv/predictors/segv/model.py", line 4 in crash
  File "/srv/predictors/segv/predictor.py", line 7 in predict
  File "/opt/predictord/model/jobs.py", line 400 in _predict_sync

Extension modules: numpy.core._multiarray_umath (total: 1)
'''


def status(code: int = 0, sig: int = 0) -> int:
    """A wait status as os.waitpid returns it."""
    return sig if sig else code << 8


def test_fault_frames_are_the_crashing_threads_innermost_first() -> None:
    frames = fault_frames(FAULT)
    assert frames[1] == ("/srv/predictors/segv/model.py", 4, "crash") and len(frames) == 4


def test_the_blame_goes_to_the_api_with_the_surest_evidence(tmp_path: Path) -> None:
    board = Scoreboard()
    files = (tmp_path / "fault.log", tmp_path / "exit.json")
    names = {0: "a", 1: "b", 2: "segv"}

    def api_of(path: str) -> str | None:
        return "segv" if "/segv/" in path else None

    board.clear_run(3)
    board.mark(3, 0, 0, 11)
    board.mark(3, 1, 1, 12)  # a and b were both in predict()
    board.set_exit(3, 1, 3)  # b called os._exit(3)
    found = examine(board, 3, status(3), files, names, api_of, None)
    assert (found.culprit, found.why, found.running) == ("b", "called os._exit(3)", {"a": 1, "b": 1})
    board.clear_run(3)
    board.mark(3, 0, 0, 11)
    board.mark(3, 1, 1, 12)
    files[0].write_text(FAULT)
    found = examine(board, 3, status(sig=signal.SIGSEGV), files, names, api_of, None)
    assert (found.culprit, found.file, found.line) == ("segv", "/srv/predictors/segv/model.py", 4)
    assert not files[0].exists(), "what a dead worker left is read once"
    unexplained = examine(board, 3, status(1), files, names, api_of, None)
    assert unexplained.culprit is None and unexplained.running == {"a": 1, "b": 1}, "two suspects: nobody is blamed"
    board.unmark(3, 1)
    assert examine(board, 3, status(1), files, names, api_of, None).culprit == "a", "the only API in predict()"
    killed = examine(board, 3, status(sig=signal.SIGKILL), files, names, api_of, None)
    assert killed.culprit is None and killed.text() == "it was running predict() of a (1)", "OOM killer: no blame"
    assert examine(board, 3, status(sig=signal.SIGKILL), files, names, api_of, "b").culprit == "b", "a hang is blamed"


def test_an_api_that_keeps_ending_its_worker_is_quarantined_until_it_changes(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    catalog, _, balancer, _, events = parts
    record = api(catalog, tmp_path, "crash")
    api(catalog, tmp_path, "ok")
    catalog.plan(balancer.slots(), balancer.gpu_room())
    blame = Autopsy("crash", "called os._exit(3)", "/srv/predictors/crash.py", 5)
    for n in range(1, 3):
        catalog.crashed(blame, 0, contain=False)
        assert record.crash is not None and record.crash.line == 5 and len(record.crashes) == n
        assert not record.quarantined and "crash" in catalog.wanted()
    catalog.crashed(blame, 0, contain=False)
    assert record.quarantined and record.error is not None and record.error.kind == "quarantine"
    assert "3 times in 60s" in record.error.message and "called os._exit(3)" in record.error.message
    assert "crash" not in catalog.wanted(), "unwanted everywhere: its replicas unload"
    assert record.target() is None
    catalog.plan(balancer.slots(), balancer.gpu_room())
    assert record.placement == (0,) or not catalog.unplaced(), "a quarantined API waits for no placement"
    assert any("quarantined" in e["text"] for e in events.recent)
    record.changed()  # its files changed: a new version gets a fresh start
    assert not record.quarantined and record.error is None and record.crashes == []


def test_a_cpu_api_that_ends_a_shared_worker_moves_to_a_worker_of_its_own(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    catalog, _, balancer, _, events = parts
    record = api(catalog, tmp_path, "crash")
    api(catalog, tmp_path, "ok")
    catalog.plan(balancer.slots(), balancer.gpu_room())
    assert balancer.kind_of("crash") == "cpu"
    catalog.crashed(Autopsy("crash", "called os._exit(3)"), record.placement[0], contain=True)
    assert record.contained and record.isolated and not record.quarantined
    balancer.dedicate()
    catalog.plan(balancer.slots(), balancer.gpu_room())
    own = [s for s, o in balancer.owners.items() if o == "crash"]
    assert record.placement == tuple(own) and own[0] not in catalog.apis["ok"].placement
    assert any(e["kind"] == "contain" for e in events.recent)
    record.changed()
    balancer.dedicate()
    assert not record.contained and not balancer.owners, "a new version shares again"


def test_crash_limit_zero_never_quarantines(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    catalog, _, _, _, _ = parts
    catalog.config = dataclasses.replace(catalog.config, workers=dataclasses.replace(catalog.config.workers,
                                                                                     crash_limit=0))
    record = api(catalog, tmp_path, "crash")
    for _ in range(10):
        catalog.crashed(Autopsy("crash", "called os._exit(1)"), 0, contain=False)
    assert not record.quarantined and len(record.crashes) == 10


def test_an_isolated_api_goes_only_on_its_own_workers_and_nothing_else_does() -> None:
    workers = [WorkerSlot(0, "cpu", "cpu"), WorkerSlot(1, "cpu", "cpu", owner="iso"), WorkerSlot(2, "cpu", "cpu")]
    placed = place(workers, {"iso": Want("cpu", 1, isolated=True), "a": Want("cpu", 3), "b": Want("cpu", 1)})
    assert placed["iso"].slots == (1,)
    assert 1 not in placed["a"].slots + placed["b"].slots and placed["a"].slots == (0, 2)
    waiting = place(workers[:1], {"iso": Want("cpu", 1, isolated=True)})["iso"]
    assert waiting.slots == () and "of its own" in (waiting.error or "")


def test_the_balancer_gives_an_isolated_api_its_own_workers_and_takes_them_back(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    catalog, _, balancer, _, _ = parts
    record = api(catalog, tmp_path, "iso", replicas=2)
    record.settings = ApiSettings(serving=ServingConfig(replicas=2, isolation="process"))
    api(catalog, tmp_path, "shared")
    balancer.dedicate()
    owned = sorted(s for s, o in balancer.owners.items() if o == "iso")
    assert len(owned) == 2 and not set(owned) & {0, 1}, "two new workers, not the shared ones"
    catalog.plan(balancer.slots(), balancer.gpu_room())
    assert record.placement == tuple(owned) and not set(catalog.apis["shared"].placement) & set(owned)
    balancer.dedicate()
    assert sorted(s for s, o in balancer.owners.items() if o == "iso") == owned, "stable: nothing is added twice"
    del catalog.apis["iso"]
    balancer.dedicate()
    assert not balancer.owners and not set(owned) & set(balancer.devices)
    assert "no longer needs a model worker of its own" in balancer.gone_why(owned[0])


def test_the_policy_grows_an_isolated_api_with_a_worker_of_its_own() -> None:
    sample = Sample(0.0, workers=(WorkerSample(0, "cpu", ("a",)), WorkerSample(1, "cpu", ("iso",), owner="iso")),
                    apis=(ApiSample("iso", "cpu", (1,), 1, 9, 1, isolated=True), ApiSample("a", "cpu", (0,), 1)))
    plan = _Plan(sample, Limits(cpu_workers_max=2), ())
    iso, shared = sample.apis
    assert plan.room(iso, "cpu") == (None, None), "never the shared worker 0, though it lacks the API"
    assert plan.room(shared, "cpu") == (None, None), "the shared API does not count iso's worker"
    plan.take(iso, "cpu", None)
    plan.take(iso, "cpu", None)
    assert plan.room(iso, "cpu")[1] == "cpu already runs its most workers (2)"


def test_a_name_with_a_file_and_a_folder_is_refused_until_one_goes(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    catalog, _, _, _, events = parts
    predictors = tmp_path / "predictors"
    catalog.config = dataclasses.replace(catalog.config, predictors=dataclasses.replace(
        catalog.config.predictors, dir=str(predictors), check_permissions=False))
    assert catalog.config.predictors_dir == predictors
    os.makedirs(predictors / "twin", exist_ok=True)
    (predictors / "twin" / "predictor.py").write_text("class PythonPredictor: ...\n")
    (predictors / "twin.py").write_text("class PythonPredictor: ...\n")
    reader = DirectoryReader(predictors, tmp_path, False, lambda: None)
    catalog.apply(reader.read(None))
    record = catalog.apis["twin"]
    assert record.error is not None and record.error.kind == "clash"
    assert str(predictors / "twin.py") in record.error.message and str(predictors / "twin") in record.error.message
    assert "twin" not in catalog.probes
    catalog.apply(reader.read(None))
    assert sum("twin" in e["text"] for e in events.recent) == 1, "said once"
    (predictors / "twin.py").unlink()
    catalog.apply(reader.read({"twin"}))
    assert record.error is None and "twin" in catalog.probes, "the folder alone is checked, then served"
    catalog.drop_probe("twin")

