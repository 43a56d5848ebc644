"""Declared requirements, environment keys, the installer's errors made short, and the CLI's argument order:
logic, no process started."""

from __future__ import annotations

from pathlib import Path

import pytest

from predictord import envs, requirements
from predictord.cli import command_first
from predictord.config import ConfigError, load_api_settings
from predictord.master.placement import Want, WorkerSlot, place
from predictord.sources import source_for


def test_references_follow_pips_spellings() -> None:
    text = "-r base.txt\n--requirement=more.txt\n-c constraints.txt  # pins\nnumpy==2.0 ; python_version > '3'\n" \
           "--constraint other.txt\n# -r commented.txt\n"
    assert requirements.references(text) == ["base.txt", "more.txt", "constraints.txt", "other.txt"]


def test_requirement_files_are_code_of_the_version_and_stay_inside_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "api"
    (folder / "reqs").mkdir(parents=True)
    (folder / "predictor.py").write_text("class PythonPredictor: ...\n")
    (folder / "requirements.txt").write_text("-r reqs/base.txt\n-c ../outside.txt\ntinypkg\n")
    (folder / "reqs" / "base.txt").write_text("-r ../requirements.txt\nhelperlib\n")  # a cycle ends
    (tmp_path / "outside.txt").write_text("x\n")
    (folder / "vocab.txt").write_text("an asset, not code\n")
    files = requirements.requirement_files(folder)
    assert files == [folder / "requirements.txt", folder / "reqs" / "base.txt"]
    code = source_for(folder).code_files()
    assert folder / "requirements.txt" in code and folder / "reqs" / "base.txt" in code
    assert folder / "vocab.txt" not in code
    before = source_for(folder).version()
    (folder / "reqs" / "base.txt").write_text("helperlib==2\n")
    assert source_for(folder).version() != before, "an edit of a file -r names is a new version"


def test_declared_and_keys(tmp_path: Path) -> None:
    folder = tmp_path / "api"
    folder.mkdir()
    assert requirements.declared(folder, (), None) is None
    listed = requirements.declared(None, ("tinypkg==1.0", "helperlib"), tmp_path / "api.toml")
    assert listed is not None and listed.installer_args() == ["tinypkg==1.0", "helperlib"]
    (folder / "requirements.txt").write_text("tinypkg==1.0\n")
    filed = requirements.declared(folder, (), None)
    assert filed is not None and filed.installer_args() == ["-r", str(folder / "requirements.txt")]
    with pytest.raises(ValueError, match="both declare requirements; keep one of them"):
        requirements.declared(folder, ("tinypkg",), folder / "predictor.toml")
    assert requirements.key(filed, "ctx") == requirements.key(filed, "ctx")
    assert requirements.key(filed, "ctx") != requirements.key(filed, "other index")
    other = tmp_path / "other"
    other.mkdir()
    (other / "requirements.txt").write_text("tinypkg==1.0\n")
    same = requirements.declared(other, (), None)
    assert same is not None and requirements.key(same, "ctx") == requirements.key(filed, "ctx"), \
        "identical requirements in two folders share one environment"


def test_dependencies_table_is_validated(tmp_path: Path) -> None:
    toml = tmp_path / "api.toml"
    toml.write_text('[dependencies]\npip = ["tinypkg==1.0"]\n')
    assert load_api_settings(toml).dependencies.pip == ("tinypkg==1.0",)
    toml.write_text('[dependencies]\npip = "tinypkg"\n')
    with pytest.raises(ConfigError, match=r"\[dependencies\]: pip: expected a list of requirements"):
        load_api_settings(toml)
    toml.write_text('[dependencies]\nconda = ["x"]\n')
    with pytest.raises(ConfigError, match="unknown key 'conda'; allowed: pip"):
        load_api_settings(toml)


@pytest.mark.parametrize("log, said", [
    ("Looking in links: /w\nERROR: Could not find a version that satisfies the requirement nosuch==1 (from "
     "versions: none)\nERROR: No matching distribution found for nosuch==1\n",
     "Could not find a version that satisfies the requirement nosuch==1 (from versions: none); No matching "
     "distribution found for nosuch==1"),
    ("Using Python 3.11.7 environment at: env\n  x No solution found when resolving dependencies:\n"
     "  ╰─▶ Because nosuch was not found in the provided package locations and you require nosuch, we can conclude "
     "that your requirements are unsatisfiable.\n",
     "╰─▶ Because nosuch was not found in the provided package locations and you require nosuch, we can conclude "
     "that your requirements are unsatisfiable."),
    ("error: No solution found when resolving dependencies\n  cause: Because nosuch was not found\n",
     "No solution found when resolving dependencies; Because nosuch was not found"),
    ("", "the installer failed without a word"),
])
def test_installer_failures_are_short_and_name_the_package(log: str, said: str) -> None:
    assert envs.failure(log) == said


def test_base_paths_leave_out_the_standard_library_and_the_working_directory() -> None:
    paths = envs.base_paths()
    assert paths and all(Path(p).is_absolute() for p in paths)
    assert not any(p.endswith("lib-dynload") for p in paths)
    assert any(Path(p, "predictord").is_dir() or Path(p, "torch").is_dir() for p in paths)


@pytest.mark.parametrize("argv, expected", [
    (["--config", "x.toml", "status"], ["status", "--config", "x.toml"]),
    (["status", "--config", "x.toml"], ["status", "--config", "x.toml"]),
    (["--config", "x.toml"], ["serve", "--config", "x.toml"]),
    ([], ["serve"]),
    (["--port", "9000", "--config", "c", "check", "p.py"], ["check", "--port", "9000", "--config", "c", "p.py"]),
    (["--help"], ["--help"]),
])
def test_the_command_may_come_after_its_options(argv: list[str], expected: list[str]) -> None:
    assert command_first(argv) == expected


def test_an_api_with_an_environment_goes_only_on_workers_of_that_environment() -> None:
    workers = [WorkerSlot(0, "cpu", "cpu"), WorkerSlot(1, "cpu", "cpu", "a", "/envs/old"),
               WorkerSlot(2, "cpu", "cpu", "a", "/envs/new")]
    placed = place(workers, {"a": Want("cpu", 1, isolated=True, env="/envs/new"), "b": Want("cpu", 1)},
                   current={"a": [1]})
    assert placed["a"].slots == (2,) and placed["b"].slots == (0,)
