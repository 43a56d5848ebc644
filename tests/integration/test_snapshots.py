"""The code copies a daemon keeps of each version: only what it may still load stays on disk."""

from __future__ import annotations

from pathlib import Path

from harness import Daemon, wait_until
from test_reload import FAST, atomic_save, gen, wait_new_version


def test_old_versions_code_copies_are_pruned(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    d = Daemon(tmp_path / "d", FAST, env={"RUNTIME_DIRECTORY": str(run)})
    d.write("a.py", gen(1))
    d.write("b.py", gen(1))
    d.start()
    try:
        d.wait_settled()
        version = d.get("/a").json()["version"]["serving"][0]
        for n in range(2, 6):
            atomic_save(d.predictors / "a.py", gen(n))
            version = wait_new_version(d, "a", version)
        (runtime,) = run.glob("predictord-*")  # the daemon's own folder under $RUNTIME_DIRECTORY

        def pruned() -> list[str] | None:
            names = sorted(p.name for p in (runtime / "snapshots").iterdir())
            return names if [n for n in names if n.startswith("a-")] == [f"a-{version}"] else None

        names = wait_until(pruned, 30, "only a's current version to be left")
        assert [n for n in names if n.startswith("b-")] == [f"b-{d.get('/b').json()['version']['wanted']}"]
        assert d.post("/a", json={}).json() == {"generation": 5}
    finally:
        d.stop()
