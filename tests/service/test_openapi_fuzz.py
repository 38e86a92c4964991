"""schemathesis against the API's own /openapi.json, with an API key, on PostgreSQL: every
operation, a bounded and derandomized number of generated requests each; no 5xx, and every
response (status, headers, body) as the document says.

Driven through schemathesis' Python API inside one plain test (its pytest plugin's lazy
fixture-based loader does not run on pytest 9).
"""

from __future__ import annotations

from collections import Counter

import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as examples

from api.main import create_app
from tests.service.factories import api_key, bearer

EXAMPLES_PER_OPERATION = 20
# A schema-valid request may still be refused for what the schema cannot say (a dataset that is
# not JSONL, a job whose dataset does not exist): that is a documented 4xx, not a failure.
SEMANTIC = [schemathesis.checks.positive_data_acceptance]


def test_every_operation_answers_as_documented(settings, sent) -> None:
    settings.rate_limit_per_s = 0  # hundreds of requests in a few seconds, by design
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings, send=sent.append))
    authorization = bearer(api_key(settings))  # a real key, checked by the real dependency each time
    failures, tried, statuses = [], [], Counter()
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @examples(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def answers_as_documented(case: schemathesis.Case) -> None:
            response = case.call_and_validate(headers=authorization, excluded_checks=SEMANTIC)
            statuses[response.status_code // 100 * 100 if response.status_code != 401 else 401] += 1

        tried.append(operation.label)
        try:
            answers_as_documented()
        except Exception as exc:  # every operation's failures, not only the first one's
            failures.append(f"{operation.label}: {exc}")
    assert len(tried) >= 14, tried
    assert not failures, "\n\n".join(failures)
    # the key got every request past authentication, and many generated requests were served
    assert statuses[401] == 0 and statuses[200] >= EXAMPLES_PER_OPERATION, statuses
