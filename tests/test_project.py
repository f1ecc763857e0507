"""The project's promises that are not about one component: docs in step with code, clean tooling."""

from __future__ import annotations

import subprocess

from gateway.settings import env_table
from tests.conftest import BIN, ROOT


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, default in env_table():
        assert f"`{name}` | `{default}`" in readme or (not default and f"`{name}` | *(empty)*" in readme), (
            name
        )


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    command = readme[readme.index("# 2. set up and run the full test suite") + 1]
    assert command.endswith("pytest")
    assert (
        "grep -A1 '^# 2\\. set up and run the full test suite' README.md"
        in (ROOT / ".ci" / "run").read_text()
    )


def test_ruff_and_mypy_are_clean() -> None:
    for command in (["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]):
        result = subprocess.run(
            [str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
