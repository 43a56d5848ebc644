from pathlib import Path

from predictord.config import describe_options


def test_readme_option_table_is_current() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert describe_options() in readme, "regenerate the README table with `predictord options`"
