"""A module namespace per API version (namespace.py), in-process: sibling modules of two folders never mix, at
import time or later; a new version runs its own helpers; unloading leaves nothing behind; errors name the user's
files."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import pytest

from predictord.loader import LoadError, instantiate, load_class
from predictord.namespace import loaded, provided
from predictord.sources import snapshot, source_for

PREDICTOR = '''
import helper
from helper import VALUE
from pkg.deep import DEEP


class PythonPredictor:
    def __init__(self, config):
        self.at_init = helper.VALUE

    def predict(self, payload):
        import helper as late
        import importlib
        by_importlib = importlib.import_module("helper")
        from . import helper as relative
        return [VALUE, late.VALUE, by_importlib.VALUE, relative.VALUE, DEEP, self.at_init]
'''


def folder(root: Path, name: str, value: str) -> Path:
    """A folder predictor with a sibling module ``helper`` and a package ``pkg`` that imports the helper too."""
    d = root / name
    (d / "pkg").mkdir(parents=True)
    (d / "predictor.py").write_text(PREDICTOR)
    (d / "helper.py").write_text(f"VALUE = {value!r}\n")
    (d / "pkg" / "__init__.py").write_text("")
    (d / "pkg" / "deep.py").write_text("from helper import VALUE\nDEEP = 'deep-' + VALUE\n")
    (d / "weights.bin").write_bytes(b"\0" * 10)
    return d


def load(path: Path, version: str, home: Path | None = None):  # type: ignore[no-untyped-def]
    imported = load_class(source_for(path, home), version)
    return imported, instantiate(imported, {}, "cpu")


def test_two_folders_with_same_named_modules_each_see_their_own(tmp_path: Path) -> None:
    (a, ia), (b, ib) = load(folder(tmp_path, "help-a", "a"), "v1"), load(folder(tmp_path, "help-b", "b"), "v1")
    try:
        assert ia.predict({}) == ["a", "a", "a", "a", "deep-a", "a"]
        assert ib.predict({}) == ["b", "b", "b", "b", "deep-b", "b"]
        assert "helper" not in sys.modules, "the folders' modules never take a plain name"
        assert {"help-a@v1.helper", "help-b@v1.helper", "help-a@v1.pkg.deep"} <= set(sys.modules)
    finally:
        a.namespace.unload()
        b.namespace.unload()
    assert not [m for m in sys.modules if m.startswith(("help-a@", "help-b@"))]
    assert "help-a@v1" not in loaded()


def test_a_new_version_runs_its_own_helpers_beside_the_old(tmp_path: Path) -> None:
    root = folder(tmp_path / "user", "api", "old")
    copy = snapshot(source_for(root), tmp_path / "snap1")
    old, old_instance = load(copy.root, "v1", copy.home)
    (root / "helper.py").write_text("VALUE = 'new'\n")
    copy = snapshot(source_for(root), tmp_path / "snap2")
    new, new_instance = load(copy.root, "v2", copy.home)
    try:
        assert old_instance.predict({})[0:2] == ["old", "old"], "the old version still runs its own helper"
        assert new_instance.predict({})[0:2] == ["new", "new"], "the edit of a helper alone is the new version"
    finally:
        old.namespace.unload()
        new.namespace.unload()


def test_a_snapshot_runs_from_the_copy_but_names_the_users_files(tmp_path: Path) -> None:
    user = folder(tmp_path / "user", "api", "x")
    (user / "predictor.py").write_text("import helper\nclass PythonPredictor:\n"
                                       "    def predict(self, payload):\n        return helper.fail()\n")
    (user / "helper.py").write_text("import os\n\ndef fail():\n    raise ValueError(os.path.dirname(__file__))\n")
    copy = snapshot(source_for(user), tmp_path / "snap")
    imported, instance = load(copy.root, "v1", copy.home)
    try:
        with pytest.raises(ValueError) as e:
            instance.predict({})
        assert str(e.value) == str(user), "__file__ is the user's path (its assets are beside it)"
        frames = traceback.extract_tb(e.value.__traceback__)
        assert (frames[-1].filename, frames[-1].lineno) == (str(user / "helper.py"), 4)
        assert frames[-1].line == "raise ValueError(os.path.dirname(__file__))", "the traceback shows the source"
        assert frames[-2].filename == str(user / "predictor.py")
    finally:
        imported.namespace.unload()


def test_load_errors_name_the_users_file_and_line(tmp_path: Path) -> None:
    user = tmp_path / "user" / "api"
    user.mkdir(parents=True)
    (user / "predictor.py").write_text("import helper\nclass PythonPredictor:\n    def predict(self, payload): pass\n")
    (user / "helper.py").write_text("x = 1\nraise KeyError('k')\n")
    copy = snapshot(source_for(user), tmp_path / "snap")
    with pytest.raises(LoadError) as e:
        load(copy.root, "v1", copy.home)
    assert (e.value.file, e.value.line) == (str(user / "helper.py"), 2)
    assert not [m for m in sys.modules if m.startswith("api@")], "a failed import leaves nothing behind"
    (user / "helper.py").write_text("x = (\n")
    copy = snapshot(source_for(user), tmp_path / "snap2")
    with pytest.raises(LoadError) as e:
        load(copy.root, "v2", copy.home)
    assert e.value.file == str(user / "helper.py") and "syntax error" in e.value.message


def test_a_missing_sibling_is_named_plainly(tmp_path: Path) -> None:
    d = tmp_path / "api"
    d.mkdir()
    (d / "predictor.py").write_text("import helper.nothing\nclass PythonPredictor:\n"
                                    "    def predict(self, payload): pass\n")
    (d / "helper.py").write_text("")
    with pytest.raises(LoadError) as e:
        load(d, "v1")
    assert "No module named 'helper.nothing'" in e.value.message and "@" not in e.value.message


def test_third_party_modules_stay_shared(tmp_path: Path) -> None:
    d = tmp_path / "api"
    d.mkdir()
    (d / "predictor.py").write_text("import json\nclass PythonPredictor:\n    def predict(self, payload):\n"
                                    "        return json\n")
    imported, instance = load(d, "v1")
    try:
        assert instance.predict({}) is sys.modules["json"]
    finally:
        imported.namespace.unload()


def test_unload_undoes_what_the_version_added_to_sys_path_and_the_environment(tmp_path: Path) -> None:
    d = tmp_path / "api"
    d.mkdir()
    (d / "predictor.py").write_text(
        "import os, sys\nsys.path.append(os.path.join(os.path.dirname(__file__), 'vendor'))\n"
        "os.environ['PREDICTORD_TEST_SET'] = 'mine'\n"
        "class PythonPredictor:\n    def __init__(self, config):\n        os.environ['PREDICTORD_TEST_INIT'] = '1'\n"
        "    def predict(self, payload): pass\n")
    path_before = list(sys.path)
    imported, _ = load(d, "v1")
    assert str(d / "vendor") in sys.path and os.environ["PREDICTORD_TEST_SET"] == "mine"
    imported.namespace.unload()
    assert sys.path == path_before
    assert "PREDICTORD_TEST_SET" not in os.environ and "PREDICTORD_TEST_INIT" not in os.environ


def test_a_single_file_predictor_is_one_module_that_provides_no_siblings(tmp_path: Path) -> None:
    (tmp_path / "other.py").write_text("VALUE = 1\n")
    p = tmp_path / "solo.py"
    p.write_text("class PythonPredictor:\n    def predict(self, payload):\n        return __name__\n")
    imported, instance = load(p, "v9")
    try:
        assert instance.predict({}) == "solo@v9"
        assert imported.namespace.provides == frozenset(), "another API's file is not a sibling module"
    finally:
        imported.namespace.unload()


def test_provided_names_are_the_folders_modules_and_packages(tmp_path: Path) -> None:
    d = folder(tmp_path, "api", "x")
    (d / "data").mkdir()
    (d / "data" / "vocab.txt").write_text("")
    assert provided(d) == {"predictor", "helper", "pkg"}


def test_atexit_hooks_run_at_unload_and_signal_handlers_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "api"
    d.mkdir()
    done = tmp_path / "closed"
    (d / "predictor.py").write_text(
        "import atexit, signal\nfrom signal import SIGTERM\n"
        f"atexit.register(lambda: open({str(done)!r}, 'w').write('bye'))\n"
        "class PythonPredictor:\n    def predict(self, payload):\n        signal.signal(SIGTERM, print)\n")
    imported, instance = load(d, "v1")
    with pytest.raises(RuntimeError, match="may not install signal handlers"):
        instance.predict({})
    assert not done.exists()
    imported.namespace.unload()
    assert done.read_text() == "bye"
