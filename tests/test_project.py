"""The project's promises that are not about one component: docs in step with code, clean tooling."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from gateway.settings import env_table
from tests.harness.processes import BIN, ROOT


def settings_rows(page: str) -> dict[str, str]:
    """variable -> default, from the rows of a page's settings tables."""
    rows = re.findall(r"^\| `(SEGSERVE_[A-Z_]+)` \| (?:`([^`]*)`|\*\(empty\)\*) \|", page, re.M)
    return dict(rows)


def test_the_configuration_page_documents_every_setting() -> None:
    documented = settings_rows((ROOT / "docs" / "configuration.md").read_text())
    assert documented == dict(env_table())


def test_every_setting_the_readme_names_is_real_with_its_default() -> None:
    named = settings_rows((ROOT / "README.md").read_text())
    assert named and named.items() <= dict(env_table()).items()


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


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # a "# comment" is no heading
    headings = re.findall(r"^#{1,6} (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_link_in_the_docs_resolves() -> None:
    """Relative links name files of the checkout, and their anchors headings of those files."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


WRITTEN_BY_RUNS = {
    "tests/artifacts/web-page.png",
    "benchmarks/results/latest.json",
}  # what the docs say a run makes


def test_every_path_the_docs_name_exists() -> None:
    named = {
        (page.name, path)
        for page in PAGES
        for path in re.findall(
            r"`((?:gateway|handlers|tests|benchmarks|deploy|docs|dashboards)/[\w./-]*)", page.read_text()
        )
    }
    assert not {
        (page, path) for page, path in named if not (ROOT / path).exists() and path not in WRITTEN_BY_RUNS
    }


def code_of(page: Path) -> list[str]:
    """The lines of a page's code blocks and its inline code spans, with shell comments cut off."""
    text = page.read_text()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
    return [line.split(" #")[0] for code in [*blocks, *spans] for line in code.splitlines()]


def test_every_segserve_command_in_the_docs_exists() -> None:
    """`segserve SUBCOMMAND --flag` as the docs write it: each subcommand and flag is one the CLI has."""
    import argparse

    from gateway.cli import parser

    root = parser()
    [subcommands] = [a for a in root._actions if isinstance(a, argparse._SubParsersAction)]
    wrong = []
    for page in PAGES:
        for line in code_of(page):
            # "-n segserve" is kubectl's namespace, and "segserve:changed" a channel: neither is the command.
            for command, rest in re.findall(
                r"(?<![\w-])(?<!-n )segserve ((?:--)?[a-z][a-z-]*)([^|&;]*)", line
            ):
                if command.startswith("--"):
                    wrong += (
                        [] if command in root._option_string_actions else [f"{page.name}: segserve {command}"]
                    )
                    continue
                if command not in subcommands.choices:
                    wrong.append(f"{page.name}: segserve {command}")
                    continue
                known = subcommands.choices[command]._option_string_actions
                wrong += [
                    f"{page.name}: segserve {command} {flag}"
                    for flag in re.findall(r"(?<!\S)(--[a-z][\w-]*)", rest)
                    if flag not in known
                ]
    assert not wrong, wrong


def test_every_benchmark_flag_in_the_docs_exists() -> None:
    used = {
        (script, flag)
        for page in PAGES
        for line in code_of(page)
        for script, rest in re.findall(r"(benchmarks/\w+\.py)((?: +[^ ]+)*)", line)
        for flag in re.findall(r"--[a-z][\w-]*", rest)
    }
    assert used, "the docs show how to run the benchmarks"
    assert not {(s, f) for s, f in used if f'"{f}"' not in (ROOT / s).read_text()}


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
