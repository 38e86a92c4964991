"""Whole training steps with vLLM generation against the Hugging Face path, our trainer only.

    OMP_NUM_THREADS=1 .venv/bin/python bench/vllm_step_bench.py [--runs realistic:3,long-1024:2]
        [--generations hf,vllm] [--repeats 1] [--threads 1] [--workdir /tmp/grpo-bench]

Each run is CONFIG:STEPS: a ``bench_common`` config (its model, data and settings, as
``trainer_bench.py`` runs them: the job spec is ``trainer_bench.spec_for``'s) trained for STEPS
optimizer steps once with each ``generation`` (hf: our decoder on the policy; vllm: a vLLM engine
in .venv-vllm, fp32 like the policy, synced after every step). Every run is its own subprocess with
``--threads`` threads; vLLM's engine gets the same count (``VLLMSampler`` defaults to the trainer's),
and the trainer waits while it samples, so each side computes on one thread at a time. The two
alternate, swapping who goes first on every repeat.

Per run the table gives the set-up seconds (``train`` called until its first step starts: model
loading, and for vLLM the engine's start), the per-step seconds, and over the timed steps (all
but the first, which carries one-off warm-up) the median seconds per step, steps per second, the
median generation and weight-sync seconds, tokens per second, and the mean sampler/trainer
log-prob gap (``sampler/logprob_diff_mean_abs``).

    .venv/bin/python bench/vllm_step_bench.py child CONFIG --generation G --steps N --out R.json

runs one side once (what the driver launches).
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

from bench_common import CONFIGS, REPO, peak_rss_mb, prepare, quiet
from trainer_bench import DEFAULT_WORKDIR, spec_for


def run_child(config_name: str, generation: str, workdir: Path, out: Path, steps: int) -> None:
    from trainer.config import RunConfig
    from trainer.loop import train
    from trainer.progress import Progress

    quiet()
    config = CONFIGS[config_name]
    prepared = prepare(config, workdir)
    spec = spec_for(config, prepared, steps)
    spec["hyperparameters"]["generation"] = generation
    run_dir = workdir / config.name / f"steps-{generation}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a continuation
    run_dir.mkdir(parents=True)

    class Recorder(Progress):
        def __init__(self) -> None:
            self.called = self.last = time.perf_counter()
            self.setup_seconds = 0.0
            self.steps: list[dict] = []

        def on_start(self, *, start_step: int, max_steps: int) -> None:
            self.last = time.perf_counter()
            self.setup_seconds = self.last - self.called

        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            now = time.perf_counter()
            self.steps.append(
                {
                    "step": step,
                    "seconds": now - self.last,
                    "generate_seconds": metrics["time/generate"],
                    "sync_seconds": metrics["time/sync"],
                    "tokens": round(metrics["tokens_per_second"] * metrics["step_seconds"]),
                    "completion_length": metrics["completion_length"],
                    "logprob_diff": metrics.get("sampler/logprob_diff_mean_abs", float("nan")),
                    "loss": metrics["loss"],
                }
            )
            self.last = now

    recorder = Recorder()
    train(RunConfig.from_spec(spec), run_dir / "output", recorder)
    out.write_text(
        json.dumps(
            {
                "config": config_name,
                "generation": generation,
                "setup_seconds": recorder.setup_seconds,
                "steps": recorder.steps,
                "peak_rss_mb": peak_rss_mb(),
            },
            indent=2,
        )
    )


def summarise(run: dict) -> dict:
    """Figures over the timed steps: every step but the first."""
    timed = run["steps"][1:]
    median = statistics.median(s["seconds"] for s in timed)
    return {
        "median_s": median,
        "steps_per_s": 1 / median,
        "generate_s": statistics.median(s["generate_seconds"] for s in timed),
        "sync_s": statistics.median(s["sync_seconds"] for s in timed),
        "tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed),
        "logprob_diff": statistics.mean(s["logprob_diff"] for s in timed),
    }


def print_table(runs: list[dict], generations: list[str]) -> None:
    print(
        "\n| config | generation | set-up s | per-step s | median s/step (steps 2+) | steps/s | "
        "generate s | sync s | tokens/s | mean abs log-prob gap | steps/s vs hf |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for config in dict.fromkeys(r["config"] for r in runs):
        mine = [r for r in runs if r["config"] == config]
        hf = [summarise(r)["steps_per_s"] for r in mine if r["generation"] == "hf"]
        for generation in generations:
            for run in (r for r in mine if r["generation"] == generation):
                figures = summarise(run)
                versus = f"{figures['steps_per_s'] / statistics.mean(hf):.2f}x" if hf else "-"
                print(
                    f"| {config} | {generation} | {run['setup_seconds']:.1f} | "
                    f"{[round(s['seconds'], 2) for s in run['steps']]} | {figures['median_s']:.2f} | "
                    f"{figures['steps_per_s']:.3f} | {figures['generate_s']:.2f} | {figures['sync_s']:.2f} | "
                    f"{figures['tokens_per_s']:.0f} | {figures['logprob_diff']:.1e} | {versus} |"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("child", help="run one side once (the driver launches this)")
    child.add_argument("config", choices=sorted(CONFIGS))
    child.add_argument("--generation", required=True)
    child.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    child.add_argument("--out", type=Path, required=True)
    child.add_argument("--steps", type=int, required=True)
    parser.add_argument("--runs", default="realistic:3,long-1024:2", help="CONFIG:STEPS, comma-separated")
    parser.add_argument("--generations", default="hf,vllm")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--save", type=Path, default=None, help="write all runs as JSON here")
    args = parser.parse_args(argv)

    if args.command == "child":
        run_child(args.config, args.generation, args.workdir, args.out, args.steps)
        return 0

    plan = [(name, int(steps)) for name, steps in (r.split(":") for r in args.runs.split(","))]
    for name, steps in plan:
        if name not in CONFIGS or steps < 2:
            parser.error(f"{name}:{steps}: a config of {sorted(CONFIGS)} and at least 2 steps")
    generations = [g.strip() for g in args.generations.split(",") if g.strip()]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for repeat in range(args.repeats):
        order = generations if repeat % 2 == 0 else generations[::-1]
        for name, steps in plan:
            for generation in order:
                out = args.workdir / name / f"steps-{generation}-{repeat}.json"
                out.unlink(missing_ok=True)
                load = os.getloadavg()[0]
                command = [sys.executable, __file__, "child", name, "--generation", generation]
                command += ["--workdir", str(args.workdir), "--out", str(out), "--steps", str(steps)]
                if subprocess.run(command, cwd=REPO, env=env).returncode != 0:
                    print(f"{name} with generation {generation} failed", file=sys.stderr)
                    return 1
                run = {**json.loads(out.read_text()), "load_before": load}
                runs.append(run)
                figures = summarise(run)
                print(
                    f"[repeat {repeat + 1}] {name} {generation}: set-up {run['setup_seconds']:.1f} s, "
                    f"steps {[round(s['seconds'], 2) for s in run['steps']]} s, median of the timed "
                    f"{figures['median_s']:.2f} s/step (generate {figures['generate_s']:.2f}, "
                    f"sync {figures['sync_s']:.2f}), load before {load:.2f}",
                    flush=True,
                )
    print_table(runs, generations)
    if args.save:
        args.save.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
