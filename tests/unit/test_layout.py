"""The package's layout is its process map: code that runs only in the master, an HTTP worker or a model worker
lives in master/, http/ or model/, and the shared pieces sit at the top. These tests keep that true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "daemon" / "predictord"
PROCESSES = ("master", "http", "model", "cluster")
# Only the entry point starts a process: `predictord serve` imports the master, `predictord ray` the cluster driver
# (lazily, inside main).
ENTRY_POINT = {"cli": {"master", "cluster"}}
# An HTTP worker and a model worker share nothing but the wire protocol (and the other shared modules); the daemon
# never imports the Ray mode (an optional extra), which takes the master's reader and the shared contract code.
NEVER = {"http": {"model", "master", "cluster"}, "model": {"http", "master", "cluster"}, "master": {"cluster"},
         "cluster": {"http", "model"}}
MAX_LINES = 500


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def imported(name: str, path: Path) -> set[str]:
    """The predictord modules that ``name`` imports, as dotted names under the package ("master.fleet", "config")."""
    package = name.split(".")[:-1] if not path.name == "__init__.py" else name.split(".")
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else list(package)
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "predictord":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import metrics` names a module; `from .x import Y` names x
                out.add(".".join([*target, alias.name]) if ".".join([*target, alias.name]) in modules() else
                        ".".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("predictord."):
                    out.add(alias.name.removeprefix("predictord."))
    return {m for m in out if m}


def owner(module: str) -> str:
    """The process a module belongs to ("master", "http", "model"), or "shared" for the package's top."""
    head = module.split(".")[0]
    return head if head in PROCESSES else "shared"


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_follow_the_process_map(name: str) -> None:
    here = owner(name)
    for target in imported(name, modules()[name]):
        there = owner(target)
        if there == here or there == "shared":
            continue
        if here == "shared":
            assert there in ENTRY_POINT.get(name, set()), (
                f"predictord/{name}.py is shared code but imports {target} ({there}/): move what both need to the "
                "package's top, or move this module into that process's folder")
        assert there not in NEVER.get(here, set()), (
            f"predictord/{name}.py ({here}/) imports {target} ({there}/): an HTTP worker and a model worker share "
            "only the wire protocol (protocol.py) and the modules at the package's top")


def test_every_process_has_its_folder_and_the_top_holds_no_process_code() -> None:
    for process in PROCESSES:
        assert (PACKAGE / process / "__init__.py").is_file()
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert not top & {"master", "arbiter", "front", "dispatch", "model_worker", "http_worker", "jobs", "fleet"}


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_stay_small(name: str) -> None:
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"predictord/{name}.py has {lines} lines (at most {MAX_LINES}): split it by concern"


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The check itself can fail: an http module that imports the model worker is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ..model.jobs import Job\nfrom ..protocol import frame\n")
    found = imported("http.bad", bad)
    assert "model.jobs" in found and "protocol" in found
    assert owner("model.jobs") in NEVER["http"]


def test_test_modules_have_unique_names() -> None:
    """pytest imports test files by basename (rootdir mode, no __init__.py): two of one name stop the collection."""
    tests = Path(__file__).resolve().parents[1]
    seen: dict[str, Path] = {}
    for path in sorted(tests.rglob("test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]} share a name: pytest collects only one; rename"
        seen[path.name] = path
