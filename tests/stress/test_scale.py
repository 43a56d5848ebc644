"""The hostile cases at full scale: 500 APIs, 16 predictors importing torch at once, 100 APIs deleted at once;
neighbours under light load. What these cost in time and memory is in RELIABILITY.md (bench/hostile.py)."""

from __future__ import annotations

from typing import Any

import psutil
from broken import OK
from harness import Load, wait_until


def test_500_apis_all_load_or_each_beyond_the_cap_says_why(make_daemon: Any) -> None:
    files = {f"a{i:03d}.py": OK for i in range(500)}
    d = make_daemon(files, "[predictors]\nmax_apis = 480\n")
    status = d.wait_settled(900)
    apis = status["apis"]
    assert len(apis) == 500, "every API is visible"
    ready = sorted(n for n, a in apis.items() if a["state"] == "ready")
    waiting = sorted(n for n, a in apis.items() if a["state"] != "ready")
    assert len(ready) == 480 and waiting == [f"a{i:03d}" for i in range(480, 500)]
    assert all(apis[n]["error"]["kind"] == "room" for n in waiting)
    for i in range(20):
        (d.predictors / f"a{i:03d}.py").unlink()
    wait_until(lambda: all(d.post(f"/{n}", json={}).status_code == 200 for n in waiting), 300, "room freed")


def test_16_predictors_importing_torch_at_once_run_at_most_max_probes_probes(make_daemon: Any) -> None:
    d = make_daemon({"ok.py": OK}, "[predictors]\nmax_probes = 2\n")
    d.wait_settled()
    assert d.proc is not None
    master = psutil.Process(d.proc.pid)
    for i in range(16):
        d.write(f"t{i:02d}.py", "import torch\n" + OK)
    seen = 0

    def probes() -> int:
        count = 0
        for child in master.children():
            try:
                count += "predictord.probe" in " ".join(child.cmdline())
            except psutil.Error:  # gone, or a zombie not yet reaped
                continue
        return count

    def settled() -> bool:
        nonlocal seen
        seen = max(seen, probes())
        apis = d.status()["apis"]
        return len(apis) == 17 and all(a["state"] == "ready" for a in apis.values())

    wait_until(settled, 300, "16 torch predictors ready", interval=0.02)
    assert 1 <= seen <= 2 and d.status()["daemon"]["probes"]["peak"] == 2


def test_deleting_100_apis_at_once_fails_no_neighbour_request(make_daemon: Any) -> None:
    files = {f"api{i:03d}.py": OK for i in range(100)}
    d = make_daemon({**files, "ok.py": OK}, "[predictors]\ndebounce = 0.3\n")
    d.wait_settled(300)
    with Load(d, {"ok": 2}, seconds=300) as load:
        wait_until(lambda: load.count("ok") > 50, 30, "load on ok")
        for name in files:
            (d.predictors / name).unlink()
        wait_until(lambda: len(d.status()["apis"]) == 1, 120, "every API gone")
        since = max(o.sent for o in load.outcomes)
        wait_until(lambda: load.served_since("ok", since, 20), 30, "ok after the deletes")
    assert load.failures("ok") == []
