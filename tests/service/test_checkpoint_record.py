"""The job record's checkpoints mirror the disk: the trainer reports each checkpoint it deletes and
the worker forgets that row; only a run that died before reporting leaves a row behind, which the
next claim forgets. Jobs run in this process (``claim_and_run``, as the Celery task calls it) on
PostgreSQL and a tiny model."""

from __future__ import annotations

import shutil

import pytest

from jobs.db import transaction
from jobs.queries import get_job, list_checkpoints
from jobs.settings import Settings
from tests.service.factories import job_spec, make_checkpoint, upload
from trainer.checkpoint import checkpoints_on_disk
from worker.runner import claim_and_run

pytestmark = pytest.mark.slow


def create_job(client, tiny_model, **hyperparameters) -> str:
    dataset_id = upload(client).json()["id"]
    created = client.post(
        "/v1/jobs", json=job_spec(dataset_id, str(tiny_model), hyperparameters=hyperparameters)
    )
    assert created.status_code == 201, created.text
    return created.json()["id"]


def recorded_and_on_disk(settings: Settings, job_id: str) -> tuple[str, list[int], list[int]]:
    with transaction(settings.database_url) as session:
        status = get_job(session=session, owner="alice", job_id=job_id).status
        recorded = [checkpoint.step for checkpoint in list_checkpoints(session=session, job_id=job_id)]
    return status, recorded, [step for step, _ in checkpoints_on_disk(settings.job_dir(job_id))]


def test_the_record_follows_the_trainers_pruning(client, settings, tiny_model) -> None:
    job_id = create_job(client, tiny_model, max_steps=4, checkpoint_every=1, keep_last_checkpoints=2)
    claim_and_run(job_id, settings=settings, worker="w1")
    assert recorded_and_on_disk(settings, job_id) == ("succeeded", [3, 4], [3, 4])


def test_a_claim_forgets_the_checkpoint_a_dead_attempt_deleted_without_saying(
    client, settings, tiny_model
) -> None:
    job_id = create_job(client, tiny_model, max_steps=3, checkpoint_every=2)
    # What a worker killed between the trainer's pruning and its report leaves: a row, no files.
    shutil.rmtree(settings.artifact_dir / make_checkpoint(settings, job_id, 1))
    claim_and_run(job_id, settings=settings, worker="w2")
    assert recorded_and_on_disk(settings, job_id) == ("succeeded", [2, 3], [2, 3])
