"""schemathesis against the API's own /openapi.json, as ``schemathesis run --checks all`` runs it:
every phase (the schema's examples; coverage, which also sends each path the methods it does not
serve; fuzzing with valid and invalid data; stateful sequences), every check, and NUL bytes allowed
in generated strings; on PostgreSQL, with a real API key. No 5xx (an exception inside the app is
one: the test client raises it, and schemathesis reports it as an error), and every response, its
status, headers (``Allow`` on a 405) and body, as the document says.

Driven through schemathesis' engine, the one its CLI runs: its pytest plugin's lazy fixture-based
loader does not run on pytest 9, and a case's ``call_and_validate`` covers the fuzzing phase alone.
"""

from __future__ import annotations

from collections import Counter

import schemathesis
from schemathesis.engine import events, from_schema

from api.main import create_app
from tests.service.factories import api_key, bearer

EXAMPLES_PER_OPERATION = 20
# Every check runs but these, each one inapplicable here:
EXCLUDED_CHECKS = [
    # A schema-valid request may still be refused for what the schema cannot say (a dataset that is
    # not JSONL, a job whose dataset does not exist, a webhook on a server with no webhook secret):
    # that is a documented 4xx, not a failure.
    "positive_data_acceptance",
]


def test_every_operation_answers_as_documented(settings, sent) -> None:
    settings.rate_limit_per_s = 0  # thousands of requests in a few seconds, by design
    config = schemathesis.Config()
    config.update(max_failures=None)  # every operation's failures, not only the first one's
    project = config.projects.override
    project.update(headers=bearer(api_key(settings)))  # a real key, checked by the real middleware each time
    project.checks.update(included_check_names=["all"], excluded_check_names=EXCLUDED_CHECKS)
    # An invalid body over GRPO_MAX_REQUEST_BYTES is refused for its size before anything reads it:
    # a documented 413 is a rejection too (schemathesis' list leaves it out).
    rejection = project.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    project.generation.update(
        max_examples=EXAMPLES_PER_OPERATION, allow_x00=True, deterministic=True, database="none"
    )
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(settings, send=sent.append), config=config
    )
    failures: list[str] = []
    tested: set[str] = set()
    statuses: Counter[int] = Counter()
    nul_requests = 0
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for node in event.recorder.cases.values():
                tested.add(node.value.operation.label)
                sent_values = (node.value.path_parameters, node.value.query, node.value.body)
                nul_requests += "\\x00" in repr(sent_values)
            statuses.update(
                interaction.response.status_code // 100 * 100
                for interaction in event.recorder.interactions.values()
                if interaction.response
            )
            failures += [
                f"{event.recorder.label} ({event.phase.value}): {check.failure_info.failure.title}\n"
                f"{check.failure_info.failure.message}\n{check.failure_info.code_sample[:2000]}"
                for checks in event.recorder.checks.values()
                for check in checks
                if check.failure_info is not None
            ]
        elif isinstance(event, events.NonFatalError):  # an exception in the app is one
            failures.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            failures.append(f"schemathesis stopped: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            failures += [f"{failure.title}: {failure.message}" for failure in event.failures]
    assert len(tested) >= 28, sorted(tested)
    assert not failures, "\n\n".join(failures)
    # many generated requests were served, and strings with NUL bytes were among those sent
    assert statuses[200] >= EXAMPLES_PER_OPERATION and statuses[500] == 0, statuses
    assert nul_requests > 0
