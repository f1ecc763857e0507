"""schemathesis against /openapi.json, every route: no 5xx, and every answer matches the schema."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.harness.servers import GatewayServer, RedisServer, Stack

CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)


def test_every_route_answers_within_its_schema(stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=stack.url, timeout=60)
            case.validate_response(response, checks=CHECKS)

        run()


@pytest.fixture(scope="module")
def lone_gateway(job_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """The gateway alone (no model server): jobs stay queued, so every step of a job's life can be taken."""
    home = tmp_path_factory.mktemp("stateful")
    with GatewayServer(job_redis, home / "blobs", home) as gateway:
        yield gateway


@pytest.mark.slow
def test_stateful_runs_follow_the_links_between_a_jobs_routes(lone_gateway: GatewayServer) -> None:
    """Submit, then read, cancel, retry, delete and fetch the mask of what was made, in the orders that the
    OpenAPI links allow: every answer within its schema, never a 5xx."""
    schema = schemathesis.openapi.from_url(f"{lone_gateway.url}/openapi.json")
    # A job's live events stream for as long as it runs, and here none ends: that route has its own tests.
    schema = schema.exclude(path="/v1/jobs/{job_id}/events")
    schema.config.base_url = lone_gateway.url
    reached: set[tuple[str, int]] = set()  # (operation, status) of each call on a job that a submission made

    class JobLife(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            # Each scenario from an empty store, so that what it draws does not hang on the one before.
            with lone_gateway.redis.client() as redis:
                redis.flushdb()

        def before_call(self, case: schemathesis.Case) -> None:
            # A wait for a job that no worker will run holds the request for its whole length (up to 60 s):
            # waits have their own tests, and here they would only make steps time out.
            for name in ("Prefer", "async_mode"):
                (case.headers or {}).pop(name, None)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, object]:
            return {"timeout": 30}  # well above any answer that holds nothing, on a slow machine

        def after_call(self, response: schemathesis.Response, case: schemathesis.Case) -> None:
            super().after_call(response, case)
            if str(case.path_parameters.get("job_id", "")).startswith("j_"):
                reached.add((case.operation.label.split(" ")[0] + " " + case.path, response.status_code))

        def validate_response(
            self, response: schemathesis.Response, case: schemathesis.Case, **kwargs: object
        ) -> None:
            # The same checks as above: random parameters are often refused, and rightly.
            case.validate_response(response, checks=list(CHECKS))

    JobLife.run(
        settings=settings(
            max_examples=50,
            stateful_step_count=6,
            # Generation only: what a step draws depends on the server's answers, which a replay cannot repeat.
            phases=[Phase.generate],
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    assert any(status < 400 for _, status in reached), f"no link from a submission was followed: {reached}"
