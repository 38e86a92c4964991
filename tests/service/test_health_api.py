"""Liveness, readiness, Prometheus metrics, the error shape of unknown routes, OpenAPI."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.main import create_app


def test_healthz(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_checks_database_and_broker(client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


def test_readyz_is_503_when_the_broker_is_down(settings) -> None:
    settings.broker_url = "redis://127.0.0.1:1/0"
    with TestClient(create_app(settings, send=lambda job_id: None)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": "ok", "broker": "unreachable"}


def test_prometheus_metrics_count_requests_and_jobs(client) -> None:
    client.get("/v1/datasets")
    client.get("/v1/jobs/job_nope")
    text = client.get("/metrics").text
    assert 'grpo_jobs{status="queued"} 0.0' in text
    assert 'grpo_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert 'grpo_http_request_seconds_count{method="GET",route="/v1/datasets"} 1.0' in text


def test_unknown_route_and_method_have_the_error_shape(client) -> None:
    response = client.get("/v2/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = client.delete("/v1/jobs")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_openapi_documents_examples_and_error_responses(client) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/v1/datasets",
        "/v1/datasets/{dataset_id}",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/metrics",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/checkpoints",
        "/v1/jobs/{job_id}/checkpoints/{step}/download",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    components = schema["components"]["schemas"]
    for name in ("JobCreate", "JobOut", "DatasetOut", "MetricsOut", "EventOut", "CheckpointOut", "ErrorOut"):
        assert components[name].get("examples"), name
    create = paths["/v1/jobs"]["post"]["responses"]
    assert {"201", "404", "409", "422"} <= set(create)
    assert create["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    assert "text/event-stream" in paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]


def test_the_api_process_never_imports_torch(settings) -> None:
    import subprocess
    import sys

    from tests.service.factories import ROOT, api_key, settings_env

    code = (
        "import sys; from fastapi.testclient import TestClient; import api.main; "
        "assert TestClient(api.main.app).get('/v1/jobs', "
        f"headers={{'Authorization': 'Bearer {api_key(settings)}'}})"
        ".status_code == 200; "
        "loaded = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=settings_env(settings), check=True, timeout=60)
