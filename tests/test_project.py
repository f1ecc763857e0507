"""The project's promises that are not about one component: docs in step with code, clean tooling."""

from __future__ import annotations

import re
import subprocess

from gateway.settings import env_table
from tests.harness.processes import BIN, ROOT


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


def documented_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the gateway serves, from its route table."""
    from starlette.routing import Route

    from gateway.app import app

    return {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or ()) - {"HEAD"}
    }


def test_every_route_is_in_the_openapi_and_the_docs() -> None:
    import yaml

    openapi = yaml.safe_load((ROOT / "gateway" / "app" / "static" / "openapi.yaml").read_text())
    described = {(m.upper(), p) for p, ops in openapi["paths"].items() for m in ops if m != "parameters"}
    pages = {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/")}  # the description and the pages
    assert documented_routes() - pages == described
    api_page = (ROOT / "docs" / "api.md").read_text()
    for method, path in documented_routes():
        route = f"{method} {path.replace('{job_id}', '{id}')}"
        assert route in api_page, f"docs/api.md does not describe {route}"


def test_readme_links_only_into_the_repository() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)]+)\)", readme):
        if target.startswith(("http://", "https://", "#")):
            continue
        assert (ROOT / target).exists(), f"README links to {target}, which a clone does not have"


def test_every_error_code_is_documented() -> None:
    """Each code the gateway answers with, and each code a worker fails a job with, is in docs/api.md."""
    source = "\n".join(path.read_text() for path in (ROOT / "gateway").rglob("*.py"))
    made = r'(?:Problem|problem_response|Outcome\.failed|JobError)\(\s*(?:\d{3},\s*)?"([a-z_]+)"'
    codes = set(re.findall(made, source))
    assert {"queue_full", "blob_store_full", "input_missing", "not_ready"} <= codes  # the pattern finds them
    api_page = (ROOT / "docs" / "api.md").read_text()
    assert not {code for code in codes if f"`{code}`" not in api_page}, "docs/api.md lacks these codes"


def test_every_test_the_docs_name_exists() -> None:
    """docs name the test behind each guarantee (`tests/x.py::name`, then `::name` for more of the same file)."""
    missing = []
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for cell in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`((?:, `::\w+`)*)", page.read_text()):
            path, first, more = cell
            source = (ROOT / path).read_text() if (ROOT / path).exists() else ""
            for name in [first, *re.findall(r"::(\w+)", more)]:
                if not re.search(rf"^(async )?def {name}\(", source, re.M):
                    missing.append(f"{page.name}: {path}::{name}")
    assert not missing, missing


def test_the_job_error_codes_are_the_documented_ones() -> None:
    """The codes a job can fail with (FailureCode) are exactly docs/api.md's "Job error codes" table."""
    from gateway.jobs.records import FAILURE_CODES

    page = (ROOT / "docs" / "api.md").read_text()
    table = page.split("### Job error codes", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M)) == FAILURE_CODES
