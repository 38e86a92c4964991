"""The demo: GRPO teaches a tiny model to sort letters, end to end through the HTTP API.

    python -m demo [--data-dir .demo] [--steps 100] [--seed 0] [--min-rise 5] [--port 8765]

1. builds a tiny model and a letter-sorting dataset (train, eval and held-out problems, none
   shared), warm-started so that it is sometimes right (cached in --data-dir; see demo/prepare.py);
2. starts the embedded service (API + workers, SQLite, file broker; no PostgreSQL, no Redis) and
   creates an API key for itself, as ``grpo keys create demo`` would;
3. uploads the training and eval sets, creates a job that evaluates every checkpoint and keeps the
   best by eval reward, and follows it step by step;
4. shows the reward curve, downloads the best checkpoint, loads it with ``from_pretrained``,
   generates from it and prints held-out accuracy before and after GRPO.

It checks its claim: it exits 1, saying so, unless held-out accuracy rose by at least
--min-rise points. Everything computes on one thread unless OMP_NUM_THREADS says otherwise: on
a small shared machine one thread per process is many times faster than contending for all.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

from api.embedded import embedded_settings
from demo.prepare import MAX_NEW_TOKENS, accuracy, prepare, rows
from jobs.db import transaction
from jobs.keys import issue_key

BARS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    """The curve in block characters, averaged into at most ``width`` buckets."""
    size = max(1, -(-len(values) // width))
    values = [
        sum(chunk) / len(chunk) for chunk in (values[i : i + size] for i in range(0, len(values), size))
    ]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(BARS[round((v - low) / span * (len(BARS) - 1))] for v in values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(client: httpx.Client, service: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise SystemExit(f"the embedded service exited with {service.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the embedded service did not become ready in time")


def create_api_key(service_dir: Path) -> str:
    """A key in the embedded service's database, made by the code behind `grpo keys create`."""
    with transaction(embedded_settings(service_dir).database_url) as session:
        _, secret = issue_key(session=session, name="demo")
    return secret


def check(response: httpx.Response) -> dict:
    if response.is_error:
        raise SystemExit(
            f"{response.request.method} {response.request.url.path} -> "
            f"{response.status_code}: {response.text}"
        )
    return response.json()


def follow(client: httpx.Client, job_id: str) -> tuple[dict, list[dict]]:
    """Print each step as it lands; return the finished job and all its metrics."""
    seen: list[dict] = []
    while True:
        job = check(client.get(f"/v1/jobs/{job_id}"))
        page = check(
            client.get(
                f"/v1/jobs/{job_id}/metrics",
                params={"after_step": seen[-1]["step"] if seen else 0, "limit": 1000},
            )
        )
        for point in page["data"]:
            m = point["metrics"]
            evaluated = f"  eval/reward {m['eval/reward']:.3f}" if m.get("eval/reward") is not None else ""
            print(
                f"  step {point['step']:3d}/{job['max_steps']}  reward {m['reward']:.3f}  "
                f"len {m['completion_length']:.1f}  {m['step_seconds']:.2f}s{evaluated}",
                flush=True,
            )
            seen.append(point)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job, seen
        time.sleep(1.0)


def upload(client: httpx.Client, path: Path) -> dict:
    with path.open("rb") as f:
        return check(client.post("/v1/datasets", files={"file": (path.name, f, "application/jsonl")}))


def job_spec(model: Path, dataset_id: str, eval_dataset_id: str, *, steps: int, seed: int) -> dict:
    """GRPO on exact answers; every checkpoint is evaluated on the eval set (greedy, the same
    reward) and the best by eval reward is kept and downloaded."""
    return {
        "name": "demo-sort",
        "base_model": str(model.resolve()),
        "dataset_id": dataset_id,
        "eval_dataset_id": eval_dataset_id,
        "reward": [{"type": "exact_match", "extract": "full", "weight": 1.0}],
        "group_size": 8,
        "hyperparameters": {
            "max_steps": steps,
            "prompts_per_step": 32,
            "learning_rate": 3e-4,
            "max_completion_length": MAX_NEW_TOKENS,
            "beta": 0.0,
            "temperature": 1.0,
            "checkpoint_every": max(1, steps // 5),
            "keep_best_by": "eval/reward",
            "seed": seed,
        },
    }


def download(client: httpx.Client, job: dict, target_root: Path) -> Path:
    """The job's best checkpoint (by eval reward), unpacked; the directory ``from_pretrained`` loads."""
    step = job["best_checkpoint_step"]
    if step is None:  # nothing evaluated (cannot happen with an eval set): the newest checkpoint
        step = check(client.get(f"/v1/jobs/{job['id']}/checkpoints"))["data"][-1]["step"]
    archive = client.get(f"/v1/jobs/{job['id']}/checkpoints/{step}/download")
    if archive.is_error:
        check(archive)
    target_root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:  # its one folder: JOB-step-N
        tar.extractall(target_root, filter="data")
    return target_root / f"{job['id']}-step-{step}"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path(".demo"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the model's initialisation, the warm start and the GRPO run",
    )
    parser.add_argument(
        "--min-rise",
        type=float,
        default=5.0,
        help="fail unless held-out accuracy rises by at least this many points",
    )
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = os.environ.get("OMP_NUM_THREADS") or "1"
    import torch

    torch.set_num_threads(int(threads))
    started = time.monotonic()

    print(f"1. model and data (cached in {args.data_dir})")
    paths = prepare(args.data_dir / "assets", seed=args.seed)
    before = accuracy(paths["model"], paths["heldout"])
    heldout = rows(paths["heldout"])
    print(f"   held-out accuracy of the warm-started model: {before:.1%} of {len(heldout)} problems")

    port = args.port or free_port()
    service_dir, service_log = args.data_dir / "service", args.data_dir / "service.log"
    print(
        f"2. starting the embedded service on http://127.0.0.1:{port} "
        f"(SQLite, file broker; log: {service_log})"
    )
    # The service loads local models only from directories its operator lists: here, the demo's own.
    env = {**os.environ, "GRPO_MODEL_DIRS": str(paths["model"].parent.resolve()), "OMP_NUM_THREADS": threads}
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "api.cli",
            "serve",
            "--embedded",
            "--port",
            str(port),
            "--data-dir",
            str(service_dir),
        ],
        env=env,
        stdout=service_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_ready(client, service)  # migrated by now: the key can go in
            client.headers["Authorization"] = f"Bearer {create_api_key(service_dir)}"
            print("3. uploading the training and eval sets and creating the job")
            dataset, eval_dataset = upload(client, paths["train"]), upload(client, paths["eval"])
            print(
                f"   dataset {dataset['id']}: {dataset['rows']} rows; eval set {eval_dataset['id']}: "
                f"{eval_dataset['rows']} rows"
            )
            spec = job_spec(
                paths["model"], dataset["id"], eval_dataset["id"], steps=args.steps, seed=args.seed
            )
            job = check(client.post("/v1/jobs", json=spec))
            print(f"   job {job['id']} {job['status']}; following it:")
            job, points = follow(client, job["id"])
            print(
                f"   job {job['status']}"
                + (f": {job.get('failure_reason')}" if job["status"] != "succeeded" else "")
            )
            if job["status"] != "succeeded":
                return 1
            curve = [p["metrics"]["reward"] for p in points]
            print(f"   reward curve {sparkline(curve)}  {curve[0]:.2f} -> {curve[-1]:.2f}")

            print(f"4. downloading the best checkpoint by eval reward (step {job['best_checkpoint_step']})")
            model_dir = download(client, job, args.data_dir / "downloaded")
    finally:
        service.terminate()
        service.wait(timeout=60)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    print(f"   from_pretrained({str(model_dir)!r}) on held-out problems:")
    for problem in heldout[:3]:
        enc = tokenizer(problem["prompt"], return_tensors="pt")
        out = model.generate(
            **enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"     {problem['prompt']}{answer}   (expected {problem['answer']})")
    after = accuracy(model_dir, paths["heldout"])
    rise = 100 * (after - before)
    print(
        f"\nheld-out accuracy: before GRPO {before:.1%}, after GRPO {after:.1%} ({rise:+.1f} points; "
        f"{len(heldout)} problems never trained on; {time.monotonic() - started:.0f} s in all)"
    )
    if rise < args.min_rise:
        print(
            f"FAILED: held-out accuracy rose {rise:+.1f} points, less than --min-rise {args.min_rise:g}: "
            f"GRPO did not show learning on this run (see {service_log})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
