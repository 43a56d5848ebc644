"""The working directory `predictord ray` ships for a version (cluster/driver.py: bundle, entry_of, pip_of), made
from a real reading of a predictors directory: the replica finds the code where its entry says, a folder's files
beside it (its predictor_dir), and its requirements file. No ray needed."""

from __future__ import annotations

from pathlib import Path

from predictord.cluster.driver import bundle, entry_of, pip_of
from predictord.config import load_api_settings
from predictord.master.reader import DirectoryReader, Seen
from predictord.sources import source_for

PREDICTOR = """class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        return payload
"""


def seen(tmp_path: Path, files: dict[str, str]) -> dict[str, Seen]:
    predictors = tmp_path / "predictors"
    for rel, text in files.items():
        (predictors / rel).parent.mkdir(parents=True, exist_ok=True)
        (predictors / rel).write_text(text)
    reading = DirectoryReader(predictors, tmp_path / "runtime", False, lambda: None).read(None)
    return reading.apis


def test_a_folder_predictor_is_bundled_in_a_folder_of_its_name_with_its_files(tmp_path: Path) -> None:
    apis = seen(tmp_path, {"vision/predictor.py": "from helpers import X\n" + PREDICTOR, "vision/helpers.py": "X = 1\n",
                           "vision/requirements.txt": "tinypkg==1.0\n", "vision/weights.bin": "w" * 1000,
                           "vision/vocab/words.txt": "cat\n", "vision/__pycache__/junk.pyc": "x"})
    where = bundle(apis["vision"], tmp_path / "bundles" / "vision-1")
    replica = source_for(where / entry_of(apis["vision"]))  # what the replica loads (cluster/replica.py)
    assert replica.code == (where / "vision" / "predictor.py").resolve() and replica.code.is_file()
    assert (replica.assets / "helpers.py").read_text() == "X = 1\n"
    assert (replica.assets / "weights.bin").stat().st_size == 1000, "the folder's files beside its code"
    assert (replica.assets / "vocab" / "words.txt").read_text() == "cat\n"
    assert not (where / "vision" / "__pycache__").exists()
    assert sorted(p.name for p in where.iterdir()) == ["vision"], "nothing at the top but the folder"
    pip = pip_of(apis["vision"], where, load_api_settings(apis["vision"].snapshot.settings))  # type: ignore[union-attr]
    assert isinstance(pip, str) and Path(pip).read_text() == "tinypkg==1.0\n"


def test_a_file_predictor_is_bundled_at_the_top_with_its_settings(tmp_path: Path) -> None:
    apis = seen(tmp_path, {"plain.py": PREDICTOR, "plain.toml": '[dependencies]\npip = ["tinypkg==1.0"]\n'})
    where = bundle(apis["plain"], tmp_path / "bundles" / "plain-1")
    replica = source_for(where / entry_of(apis["plain"]))
    assert replica.code == (where / "plain.py").resolve() and replica.code.read_text() == PREDICTOR
    assert pip_of(apis["plain"], where, load_api_settings(replica.settings)) == ["tinypkg==1.0"]
