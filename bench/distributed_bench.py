"""One job on N processes against one process, each process one thread, on a bench config.

    .venv/bin/python bench/distributed_bench.py [--config realistic] [--nproc 2] [--steps 3]
        [--gradient-checkpointing] [--release-freed-memory]
        [--repeats 1] [--reshard auto|layer,step] [--workdir /tmp/grpo-bench]

Builds the config's model and data (``bench_common.prepare``, in a subprocess: this driver never
loads torch), then runs ``python -m trainer run SPEC --nproc N`` (torchrun's launcher, gloo, FSDP2)
once per ``--reshard`` value (``fsdp_reshard``), and the spec in one process, every process with
OMP_NUM_THREADS=1, alternating which goes first on each repeat. Prints, per side: the median
seconds per step (rank 0's ``step_seconds``; step 1, the warm-up, skipped), steps per second and
the speed-up; each worker process's peak RSS (its VmHWM, read from /proc while it runs, the last
reading before it exits), and that peak less what a process that only imported the trainer holds
(the job's own memory); and every step's loss, the same on every side (how the work is split
changes no result).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import CONFIGS, REPO
from trainer_bench import spec_for

DEFAULT_WORKDIR = Path("/tmp/grpo-bench")


def vm_hwm_mb(pid: int) -> float | None:
    """A live process's peak resident set so far (VmHWM), in MB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker_ranks(root: int) -> dict[int, int]:
    """The training processes of the tree under ``root``: pid -> RANK (``root`` itself, rank 0,
    when it trains alone; else its descendants that torchrun gave a RANK)."""
    import psutil

    found = {}
    for process in [psutil.Process(root), *psutil.Process(root).children(recursive=True)]:
        try:
            rank = process.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            found[process.pid] = int(rank)
    return found or {root: 0}


def runtime_rss_mb(env: dict) -> float:
    """The resident set of a process that has imported what the trainer imports and loaded no
    model: what every process pays before the job's own memory (weights, gradients, optimizer
    state, activations)."""
    probe = (
        "import resource, trainer.__main__, trainer.loop; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, check=True, capture_output=True, text=True
    )
    return int(done.stdout.split()[-1]) / 1024


def run_side(spec: Path, output: Path, nproc: int, env: dict) -> dict:
    """One run; its per-step metrics and each worker's peak RSS."""
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "trainer", "run", str(spec), "--output", str(output)]
    process = subprocess.Popen(command + ["--nproc", str(nproc)], cwd=REPO, env=env)
    peaks: dict[int, float] = {}  # rank -> MB
    while process.poll() is None:
        for pid, rank in worker_ranks(process.pid).items():
            hwm = vm_hwm_mb(pid)
            if hwm is not None:
                peaks[rank] = max(peaks.get(rank, 0.0), hwm)
        time.sleep(0.1)
    if process.returncode != 0:
        raise SystemExit(f"the {nproc}-process run failed (exit {process.returncode})")
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {"steps": steps, "peak_rss_mb": [peaks[r] for r in sorted(peaks)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="realistic", choices=sorted(CONFIGS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per run; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument(
        "--reshard",
        default="auto",
        help="comma-separated fsdp_reshard values, one multi-process side each (auto, layer, step)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="every side recomputes each layer's activations in the backward (what large models train with)",
    )
    parser.add_argument(
        "--release-freed-memory",
        action="store_true",
        help="glibc gives freed memory back at once (every side), so that a peak RSS is the most a "
        "process held, not what its allocator kept from earlier phases; slower (fresh pages for every "
        "large allocation): read the memory columns of such a run, not its seconds",
    )
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is warm-up)")

    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if args.release_freed_memory:  # allocations over 64 KiB mapped alone, unmapped when freed; no heap kept
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    config = CONFIGS[args.config]
    prepared = json.loads(
        subprocess.run(
            [sys.executable, str(REPO / "bench" / "trainer_bench.py"), "prepare", config.name]
            + ["--workdir", str(args.workdir)],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    run_dir = (
        args.workdir / config.name / ("distributed-gc" if args.gradient_checkpointing else "distributed")
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"{config.name}: {prepared['parameters'] / 1e6:.1f}M parameters, {args.steps} steps per run"
        + (", gradient checkpointing" if args.gradient_checkpointing else ""),
        flush=True,
    )

    # (processes, fsdp_reshard): one process, then N processes with each way of holding the model
    sides = [(1, "auto")] + [(args.nproc, reshard) for reshard in args.reshard.split(",")]
    specs = {}
    for _, reshard in sides:
        specs[reshard] = run_dir / f"spec-{reshard}.json"
        body = spec_for(config, prepared, args.steps)
        body["hyperparameters"]["fsdp_reshard"] = reshard
        body["hyperparameters"]["gradient_checkpointing"] = args.gradient_checkpointing
        specs[reshard].write_text(json.dumps(body, indent=2))
    results: dict[tuple[int, str], list[dict]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for nproc, reshard in sides if repeat % 2 == 0 else sides[::-1]:
            output = run_dir / f"nproc{nproc}-{reshard}"
            results[nproc, reshard].append(run_side(specs[reshard], output, nproc, env))

    seconds = {
        side: statistics.median(s["step_seconds"] for r in results[side] for s in r["steps"][1:])
        for side in sides
    }
    peak = {side: max(max(r["peak_rss_mb"]) for r in results[side]) for side in sides}
    runtime = runtime_rss_mb(env)
    one = sides[0]
    print(f"\n=== {config.name}: {args.nproc} processes x 1 thread vs 1 process x 1 thread ===")
    print(f"the runtime alone (imports, no model): {runtime:.0f} MB a process")
    print(
        f"{'side':>18} {'median s/step':>14} {'steps/s':>8} {'speed-up':>9} "
        f"{'peak RSS MB per process':>24} {'vs 1':>6} {'above runtime':>14} {'vs 1':>6}"
    )
    for side in sides:
        nproc, reshard = side
        per_process = ", ".join(f"{mb:.0f}" for mb in results[side][-1]["peak_rss_mb"])
        label = "1 process" if nproc == 1 else f"{nproc} x {reshard}"
        print(
            f"{label:>18} {seconds[side]:>14.3f} {1 / seconds[side]:>8.3f} "
            f"{seconds[one] / seconds[side]:>8.2f}x "
            f"{per_process:>24} {peak[side] / peak[one]:>5.2f}x {peak[side] - runtime:>13.0f} "
            f"{(peak[side] - runtime) / (peak[one] - runtime):>5.2f}x"
        )
    for side in sides:
        for i, r in enumerate(results[side]):
            print(
                f"  {side[0]} process(es) {side[1]}, run {i + 1}: "
                f"per-step s {[round(s['step_seconds'], 2) for s in r['steps']]}; "
                f"generate s {[round(s['time/generate'], 2) for s in r['steps']]}; "
                f"train s {[round(s['time/train'], 2) for s in r['steps']]}; "
                f"loss {[round(s['loss'], 5) for s in r['steps']]}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
