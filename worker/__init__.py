"""Celery workers: the task that runs one GRPO job, its heartbeat, and the sweeper."""
