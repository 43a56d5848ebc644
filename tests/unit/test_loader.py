from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from predictord import sources
from predictord.loader import LoadError, batch_sizes, inspect_class, instantiate, load_class, warm_up
from predictord.sources import (
    MAX_CODE_BYTES,
    Unreadable,
    code_of,
    is_ignored,
    name_problem,
    next_load,
    scan,
    source_for,
)


def src(tmp_path: Path, text: str, name: str = "p.py") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def sig_of(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    return load_class(source_for(src(tmp_path, text)), f"t{abs(hash(text))}").signature


def test_arguments_are_found_by_name(tmp_path: Path) -> None:
    s = sig_of(tmp_path, "class PythonPredictor:\n  def __init__(self, config, device): pass\n"
                         "  def predict(self, headers, payload): pass\n")
    assert s.predict_args == ("headers", "payload") and s.init_args == ("config", "device") and not s.is_async
    s = sig_of(tmp_path, "class PythonPredictor:\n  async def predict(self, payload): pass\n"
                         "  def post_predict(self, response, payload): pass\n")
    assert s.is_async and s.init_args == () and s.post_predict_args == ("response", "payload")
    s = sig_of(tmp_path, "class PythonPredictor:\n  def predict(self, payload, **kw): pass\n")
    assert s.predict_args == ("payload", "query_params", "headers")


@pytest.mark.parametrize("text,message", [
    ("class PythonPredictor:\n  def predict(self, body): pass\n",
     "predict() asks for 'body'; allowed: payload, query_params, headers"),
    ("class PythonPredictor:\n  def __init__(self, cfg): pass\n  def predict(self, payload): pass\n",
     "__init__() asks for 'cfg'; allowed: config, device, predictor_dir"),
    ("class PythonPredictor:\n  def predict(self, *args): pass\n", "predict() takes *args"),
    ("class PythonPredictor:\n  pass\n", "has no predict method"),
    ("PythonPredictor = 3\n", "PythonPredictor is a int, not a class"),
    ("class Other:\n  pass\n", "no class named PythonPredictor"),
])
def test_contract_violations_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(LoadError) as e:
        sig_of(tmp_path, text)
    assert message in e.value.message
    assert e.value.file == str(tmp_path / "p.py")


def test_errors_point_at_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as e:
        sig_of(tmp_path, "x = 1\ny = (\n")
    assert e.value.line == 2 and "syntax error" in e.value.message
    with pytest.raises(LoadError) as e:
        sig_of(tmp_path, "import os\nraise KeyError('k')\n")
    assert (e.value.line, e.value.message) == (2, "importing it raised KeyError: 'k'")


def test_names() -> None:
    assert name_problem("sentiment-v2_a") is None
    assert "reserved" in (name_problem("healthz") or "")
    for bad in ("Upper", "-lead", "sp ace", "dot.ted", "x" * 64):
        assert "not a valid API name" in (name_problem(bad) or ""), bad
    for ignored in (".hidden.py", "a.py~", ".a.py.swp", "x.tmp", "__pycache__"):
        assert is_ignored(ignored)


def test_scan_finds_files_and_folders(tmp_path: Path) -> None:
    src(tmp_path, "", "one.py")
    src(tmp_path, "", "one.toml")
    (tmp_path / "two").mkdir()
    src(tmp_path / "two", "", "predictor.py")
    (tmp_path / "assets").mkdir()  # no predictor.py: not an API
    src(tmp_path, "", ".hidden.py")
    src(tmp_path, "", "notes.txt")
    found = scan(tmp_path).apis
    assert sorted(found) == ["one", "two"]
    assert found["two"].root == tmp_path / "two" and found["one"].settings == tmp_path / "one.toml"


def test_a_version_is_code_and_settings_not_assets(tmp_path: Path) -> None:
    """Code and settings make a version (their contents: the same on every host); a touch, or a new folder moved in
    with the same code, changes the stamp alone (the daemon loads it again); an asset the predictor writes into its
    folder changes neither (it would reload itself for ever)."""
    folder = tmp_path / "api"
    folder.mkdir()
    code = src(folder, "a = 1", "predictor.py")
    s = source_for(folder)
    v1, stamp1 = s.identity()
    src(folder, "a = 2", "predictor.py")
    v2, _ = s.identity()
    src(folder, "[config]", "predictor.toml")
    v3, stamp3 = s.identity()
    assert len({v1, v2, v3}) == 3
    os.utime(code, ns=(1, 1))
    v4, stamp4 = s.identity()
    assert v4 == v3 and stamp4 != stamp3, "a touch: the same version, a new stamp"
    src(folder, "weights", "w.bin")
    src(folder, "junk", ".swp")
    (folder / "cache").mkdir()
    src(folder / "cache", "written at run time", "x.bin")
    assert s.identity() == (v4, stamp4), "assets and editor droppings are part of neither"
    moved = tmp_path / "new"
    shutil.copytree(folder, moved, copy_function=shutil.copy2)
    shutil.rmtree(folder)
    moved.rename(folder)
    assert s.identity()[0] == v4 and s.identity()[1] != stamp4, "a folder moved in: the same code, a new stamp"
    other = tmp_path / "elsewhere" / "api"
    shutil.copytree(folder, other)  # another host: new mtimes and inode, the same files
    assert source_for(other).version() == v4, "the same files are the same version on every host"
    assert (code_of(v4), next_load(v4), next_load(next_load(v4))) == (v4, f"{v4}-1", f"{v4}-2")
    assert code_of(f"{v4}-2") == v4


def test_only_regular_files_of_bounded_size_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "api"
    folder.mkdir()
    src(folder, "a = 1", "predictor.py")
    os.mkfifo(folder / "predictor.toml")
    with pytest.raises(Unreadable, match="predictor.toml: is a FIFO, not a regular file"):
        source_for(folder).version()
    (folder / "predictor.toml").unlink()
    (folder / "predictor.toml").symlink_to("/dev/zero")
    with pytest.raises(Unreadable, match="is a character device"):
        source_for(folder).version()
    (folder / "predictor.toml").unlink()
    with (folder / "predictor.toml").open("wb") as f:
        f.truncate(MAX_CODE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(Unreadable, match="a code or settings file may have at most 16 MiB"):
        source_for(folder).version()
    (folder / "predictor.toml").unlink()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "predictor.toml"))
        with pytest.raises(Unreadable, match="predictor.toml: is a socket, not a regular file"):
            source_for(folder).version()


def test_a_folder_of_too_many_entries_is_refused_not_walked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_ENTRIES", 50)
    folder = tmp_path / "api"
    (folder / "data").mkdir(parents=True)
    src(folder, "a = 1", "predictor.py")
    for i in range(60):
        (folder / "data" / f"{i}.bin").touch()
    with pytest.raises(Unreadable, match="more than 50 files and folders; keep large data sets outside"):
        source_for(folder).version()


def test_scan_follows_links_only_to_predictors(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    src(real, "class PythonPredictor: ...", "predictor.py")
    directory = tmp_path / "predictors"
    directory.mkdir()
    (directory / "linked").symlink_to(real)
    (directory / "rootlink").symlink_to("/")
    (directory / "gone").symlink_to(tmp_path / "nothing")
    found = scan(directory)
    assert list(found.apis) == ["linked"] and found.links == {real: "linked"}
    assert "holds no predictor.py; not an API" in found.notes["rootlink"]
    assert "which is not there" in found.notes["gone"]


def test_inspect_rejects_non_class(tmp_path: Path) -> None:
    with pytest.raises(LoadError):
        inspect_class(lambda: None, source_for(src(tmp_path, "")))


def test_snapshot_copies_code_not_assets_and_maps_paths_back(tmp_path: Path) -> None:
    from predictord.sources import snapshot

    folder = tmp_path / "preds" / "api"
    (folder / "lib").mkdir(parents=True)
    src(folder, "import helper", "predictor.py")
    src(folder / "lib", "x = 1", "helper.py")
    src(folder, "[config]", "predictor.toml")
    src(folder, "big weights", "w.bin")
    snap = snapshot(source_for(folder), tmp_path / "snap")
    assert snap.name == "api" and snap.root.name == "api" and snap.assets == folder
    assert (snap.root / "lib" / "helper.py").read_text() == "x = 1" and not (snap.root / "w.bin").exists()
    assert snap.original(str(snap.root / "lib" / "helper.py")) == str(folder / "lib" / "helper.py")
    single = snapshot(source_for(src(tmp_path, "a = 1", "one.py")), tmp_path / "snap1")
    assert single.code.read_text() == "a = 1" and single.assets == tmp_path
    assert single.original(str(single.code)) == str(tmp_path / "one.py")


def test_batch_sizes_a_warm_up_runs() -> None:
    assert [batch_sizes(n) for n in (1, 2, 3, 8, 12, 32)] == [[], [2], [2, 3], [2, 4, 8], [2, 4, 8, 12],
                                                                 [2, 4, 8, 16, 32]]


WARMED_BATCHES = '''
class PythonPredictor:
    def __init__(self, config):
        self.seen = []
        self.fail_from = config.get("fail_from", 0)

    def predict(self, payload, query_params):
        if isinstance(payload, dict):  # no batching: the payload itself
            self.seen.append(payload["n"])
            return payload["n"]
        assert len(query_params) == len(payload)
        if self.fail_from and len(payload) >= self.fail_from:
            raise MemoryError(f"no room for a batch of {len(payload)}")
        self.seen.append([p["n"] for p in payload])
        return [p["n"] for p in payload]
'''


def test_a_batching_warm_up_runs_each_sample_then_each_batch_size_up_to_the_largest(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    (folder / "s").mkdir(parents=True)
    (folder / "predictor.py").write_text(WARMED_BATCHES)
    (folder / "s" / "one.json").write_text('{"n": 1}')
    (folder / "s" / "two.json").write_text('{"n": 2}')
    imported = load_class(source_for(folder), "v1")
    predictor = instantiate(imported, {}, "cpu")
    warm_up(imported, predictor, ("s/one.json", "s/two.json"), 6)
    assert predictor.seen == [[1], [2], [1, 2], [1, 2, 1, 2], [1, 2, 1, 2, 1, 2]]

    failing = instantiate(imported, {"fail_from": 4}, "cpu")
    with pytest.raises(LoadError) as e:
        warm_up(imported, failing, ("s/one.json",), 6)
    problem = e.value.problem()
    assert problem.message == "warm-up batch of 4 (the samples in turn): predict() raised MemoryError: no room for a " \
                              "batch of 4", problem
    assert (problem.file, problem.line) == (str(folder / "predictor.py"), 13), "the user's line that raised"
    alone = instantiate(imported, {}, "cpu")
    warm_up(imported, alone, ("s/one.json",), 1)
    assert alone.seen == [1], "without batching, predict() takes each sample itself, once"


def test_close_of_a_version_that_failed_its_warm_up_is_bounded_and_its_failure_logged(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from predictord.model import worker
    from predictord.model.loaded import LOADING, owner

    monkeypatch.setattr(worker, "CLOSE_TIMEOUT", 0.2)
    seen: list[str | None] = []
    token = LOADING.set("n@v1")
    try:
        worker.ModelWorker._close_unready("n", "v1", lambda: seen.append(owner()))
    finally:
        LOADING.reset(token)
    assert seen == ["n@v1"], "close() runs in the load's context: what it prints or starts is that version's"

    def raising() -> None:
        raise RuntimeError("cannot close")

    hang = threading.Event()
    worker.ModelWorker._close_unready("n", "v1", raising)
    worker.ModelWorker._close_unready("n", "v1", hang.wait)  # returns after CLOSE_TIMEOUT, the thread left behind
    hang.set()
    assert "API n version v1: close() raised after its warm-up failed" in caplog.text
    assert "API n version v1: close() took longer than 0.2s; going on without it" in caplog.text
