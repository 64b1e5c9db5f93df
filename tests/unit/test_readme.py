"""The README's two set-up commands stay the ones CI runs."""

from __future__ import annotations

import re

from tests.support import ROOT


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, re.S)[:2]


def test_readme_has_a_run_and_a_test_command() -> None:
    run, test = setup_commands()
    assert "\n" not in run and "\n" not in test
    assert "pip install" in run and "pip install" in test
    assert "scripts/test" in test


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci
