"""A small Python client of the GRPO fine-tuning service.

from grpo_client import Client
grpo = Client()  # GRPO_API_URL and GRPO_API_KEY, or Client("http://host:8000", api_key="grpo_...")
dataset = grpo.datasets.upload("arith.jsonl")
job = grpo.jobs.create(
    {"base_model": "...", "dataset_id": dataset["id"], "reward": [{"type": "exact_match"}]}
)
for row in grpo.jobs.metrics(job["id"]):
    print(row["step"], row["metrics"]["reward"])
"""

from grpo_client.client import Client
from grpo_client.errors import GrpoError
from grpo_client.transport import RetryPolicy

__all__ = ["Client", "GrpoError", "RetryPolicy"]
