"""One job on N processes against one process, each process one thread, on a bench config.

    .venv/bin/python bench/distributed_bench.py [--config realistic] [--nproc 2] [--steps 3]
        [--repeats 1] [--workdir /tmp/grpo-bench]

Builds the config's model and data (``bench_common.prepare``, in a subprocess: this driver never
loads torch), then runs ``python -m trainer run SPEC --nproc N`` (torchrun's launcher, gloo, FSDP2)
and the same spec in one process, every process with OMP_NUM_THREADS=1, alternating which goes
first on each repeat. Prints, per side: the median seconds per step (rank 0's ``step_seconds``;
step 1, the warm-up, skipped), steps per second and the speed-up; each worker process's peak RSS
(its VmHWM, read from /proc while it runs, the last reading before it exits); and every step's
loss, the same on both sides (how the work is split changes no result).
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
    run_dir = args.workdir / config.name / "distributed"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / "spec.json"
    spec.write_text(json.dumps(spec_for(config, prepared, args.steps), indent=2))
    print(
        f"{config.name}: {prepared['parameters'] / 1e6:.1f}M parameters, {args.steps} steps per run",
        flush=True,
    )

    sides = (1, args.nproc)
    results: dict[int, list[dict]] = {n: [] for n in sides}
    for repeat in range(args.repeats):
        for nproc in sides if repeat % 2 == 0 else sides[::-1]:
            results[nproc].append(run_side(spec, run_dir / f"nproc{nproc}", nproc, env))

    seconds = {
        n: statistics.median(s["step_seconds"] for r in results[n] for s in r["steps"][1:]) for n in sides
    }
    peak = {n: max(max(r["peak_rss_mb"]) for r in results[n]) for n in sides}
    print(f"\n=== {config.name}: {args.nproc} processes x 1 thread vs 1 process x 1 thread ===")
    print(
        f"{'processes':>9} {'median s/step':>14} {'steps/s':>8} {'speed-up':>9} "
        f"{'peak RSS MB per process':>28}"
    )
    for n in sides:
        per_process = ", ".join(f"{mb:.0f}" for mb in results[n][-1]["peak_rss_mb"])
        print(
            f"{n:>9} {seconds[n]:>14.3f} {1 / seconds[n]:>8.3f} {seconds[1] / seconds[n]:>8.2f}x "
            f"{per_process:>28}   ({peak[n] / peak[1]:.2f}x the single process)"
        )
    for n in sides:
        for i, r in enumerate(results[n]):
            print(
                f"  {n} process(es), run {i + 1}: "
                f"per-step s {[round(s['step_seconds'], 2) for s in r['steps']]}; "
                f"generate s {[round(s['time/generate'], 2) for s in r['steps']]}; "
                f"loss {[round(s['loss'], 5) for s in r['steps']]}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
