"""Our trainer against TRL's GRPOTrainer, side by side, on the same model, data and settings.

    .venv/bin/python bench/trainer_bench.py [--configs toy,realistic,realistic-small] [--steps N]
        [--repeats 2] [--threads 1] [--workdir /tmp/grpo-bench] [--trl-python .venv-bench/bin/python]

Long completions: ``--configs long-256,long-1024,long-2048`` (the realistic 24M/32k model, whose
EOS never comes, so every completion runs to the length; 2 prompts x G=8 a step; a warm-up step
and one timed step each, see ``bench_common.CONFIGS``).

The driver (this file, in ``.venv``: no trl) builds each config's model and data once, then runs
each side as its own subprocess, alternating ours/TRL and swapping who goes first on every
repeat, so that a busy neighbour on the machine slows both. Each child writes a JSON record of
its steps; the driver prints, per config, the median seconds per step (step 1 skipped as
warm-up), tokens per second over the timed steps, peak RSS and the loss of every step.

    .venv/bin/python bench/trainer_bench.py child CONFIG --workdir W --out RESULT.json --steps N

runs our side alone (what the driver launches); ``bench/trl_bench.py`` is TRL's side.
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

from bench_common import (
    CONFIGS,
    REPO,
    BenchConfig,
    StepRecord,
    parameter_count,
    peak_rss_mb,
    prepare,
    quiet,
    write_result,
)

DEFAULT_WORKDIR = Path("/tmp/grpo-bench")


# --- our side ------------------------------------------------------------------------------------


def spec_for(config: BenchConfig, prepared: dict, steps: int) -> dict:
    """The job spec our side runs (``python -m trainer run`` takes the same JSON)."""
    return {
        "name": f"bench-{config.name}",
        "base_model": prepared["model_dir"],
        "dataset": prepared["dataset"],
        "reward": config.reward_spec,
        "group_size": config.group_size,
        "hyperparameters": {
            "prompts_per_step": config.prompts_per_step,
            "max_steps": steps,
            "learning_rate": config.learning_rate,
            "lr_schedule": "constant",
            "warmup_steps": 0,
            "adam_beta1": 0.9,
            "adam_beta2": 0.99,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "max_prompt_length": 512,
            "max_completion_length": config.max_completion_length,
            "temperature": 1.0,
            "top_p": 1.0,
            "beta": config.beta,
            "epsilon": config.epsilon,
            "num_iterations": 1,
            "loss_type": config.loss_type,
            "scale_rewards": "group",
            "dtype": "float32",
            "seed": config.seed,
            "checkpoint_every": 0,
            "keep_last_checkpoints": 1,  # only the final one, after the last step
            "num_samples_logged": 0,
        },
    }


def run_ours(config_name: str, workdir: Path, out: Path, steps: int) -> None:
    from trainer.config import RunConfig
    from trainer.loop import train
    from trainer.progress import Progress

    quiet()
    config = CONFIGS[config_name]
    prepared = prepare(config, workdir)
    spec = spec_for(config, prepared, steps)
    run_dir = workdir / config.name / "ours"
    shutil.rmtree(run_dir / "output", ignore_errors=True)  # a fresh run, not a continuation
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))

    class Recorder(Progress):
        def __init__(self) -> None:
            self.records: list[StepRecord] = []
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_start(self, *, start_step: int, max_steps: int) -> None:
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            now, cpu = time.perf_counter(), time.process_time()
            self.records.append(
                StepRecord(
                    step=step,
                    seconds=now - self.last,
                    generate_seconds=metrics["time/generate"],
                    cpu_seconds=cpu - self.last_cpu,
                    tokens=round(metrics["tokens_per_second"] * metrics["step_seconds"]),
                    loss=metrics["loss"],
                    reward=metrics["reward"],
                    frac_reward_zero_std=metrics["frac_reward_zero_std"],
                    completion_length=metrics["completion_length"],
                    kl=metrics["kl"],
                    peak_rss_mb=peak_rss_mb(),
                )
            )
            self.last, self.last_cpu = now, cpu

    recorder = Recorder()
    train(
        RunConfig.from_spec(spec), run_dir / "output", recorder
    )  # the final checkpoint is saved after the last on_step
    write_result(
        out, side="ours", config=config_name, steps=recorder.records, extra={"final_rss_mb": peak_rss_mb()}
    )


# --- the driver ----------------------------------------------------------------------------------


def launch(command: list[str], env: dict) -> tuple[int, float, float]:
    """Run a child; return its exit status, wall seconds and whole-process peak RSS in MB."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not the max over all children
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024


def summarise(steps: list[dict]) -> dict:
    """Figures over the timed steps (every step but each run's first)."""
    seconds = [s["seconds"] for s in steps]
    return {
        "median_s": statistics.median(seconds),
        "median_generate_s": statistics.median(s["generate_seconds"] for s in steps),
        "median_rest_s": statistics.median(s["seconds"] - s["generate_seconds"] for s in steps),
        "median_cpu_s": statistics.median(s["cpu_seconds"] for s in steps),
        "tokens_per_s": sum(s["tokens"] for s in steps) / sum(seconds),
        "zero_std": statistics.mean(s["frac_reward_zero_std"] for s in steps),
        "completion_length": statistics.mean(s["completion_length"] for s in steps),
    }


def print_table(config: str, runs: dict[str, list[dict]]) -> None:
    """Medians pool the timed steps of all runs of a side; "best run" is the fastest run's median
    (noise from other processes only ever slows a run down)."""
    pooled = {side: summarise([s for r in runs[side] for s in r["steps"][1:]]) for side in runs}
    best = {side: min(summarise(r["steps"][1:])["median_s"] for r in runs[side]) for side in runs}
    rss = {side: max(r["steps"][-1]["peak_rss_mb"] for r in runs[side]) for side in runs}
    columns = ("median_s", "median_generate_s", "median_rest_s", "median_cpu_s")
    print(f"\n=== {config} ({len(runs['ours'])} run(s) per side, step 1 of each skipped) ===")
    print(
        f"{'':>6} {'median s/step':>14} {'best run':>9} {'generate':>9} {'the rest':>9} {'CPU s':>8} "
        f"{'tokens/s':>10} {'peak RSS MB':>12} {'zero-std':>9} {'compl. len':>10}"
    )
    for side in ("ours", "trl"):
        p = pooled[side]
        print(
            f"{side:>6} {p['median_s']:>14.3f} {best[side]:>9.3f} {p['median_generate_s']:>9.3f} "
            f"{p['median_rest_s']:>9.3f} {p['median_cpu_s']:>8.3f} "
            f"{p['tokens_per_s']:>10.0f} {rss[side]:>12.0f} "
            f"{p['zero_std']:>9.2f} {p['completion_length']:>10.1f}"
        )
    ratios = [pooled["trl"][c] / pooled["ours"][c] for c in columns]
    print(
        f"{'ratio':>6} {ratios[0]:>13.2f}x {best['trl'] / best['ours']:>8.2f}x "
        f"{ratios[1]:>8.2f}x {ratios[2]:>8.2f}x "
        f"{ratios[3]:>7.2f}x {pooled['ours']['tokens_per_s'] / pooled['trl']['tokens_per_s']:>9.2f}x "
        f"{rss['ours'] / rss['trl']:>11.2f}x   (speed: TRL/ours; memory: ours/TRL)"
    )
    for side in ("ours", "trl"):
        for i, r in enumerate(runs[side]):
            print(
                f"  {side} run {i + 1} (load {r['load_before']:.2f}): per-step s "
                f"{[round(s['seconds'], 2) for s in r['steps']]}; "
                f"loss {[round(s['loss'], 4) for s in r['steps']]}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("child", help="run our side once (the driver launches this)")
    child.add_argument("config", choices=sorted(CONFIGS))
    child.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    child.add_argument("--out", type=Path, required=True)
    child.add_argument("--steps", type=int, required=True)
    build = sub.add_parser("prepare", help="build a config's model and data (the driver runs this first)")
    build.add_argument("config", choices=sorted(CONFIGS))
    build.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--configs", default="toy,realistic,realistic-small")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the config's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--trl-python", default=str(REPO / ".venv-bench" / "bin" / "python"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads for both sides (OMP_NUM_THREADS); see bench/RESULTS.md for why 1",
    )
    parser.add_argument("--save", type=Path, default=None, help="write all results as JSON here")
    args = parser.parse_args(argv)

    if args.command == "child":
        run_ours(args.config, args.workdir, args.out, args.steps)
        return 0
    if args.command == "prepare":
        quiet()
        prepared = prepare(CONFIGS[args.config], args.workdir)
        prepared["parameters"] = parameter_count(prepared["model_dir"])
        print(json.dumps(prepared))
        return 0

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    args.workdir.mkdir(parents=True, exist_ok=True)
    for name in configs:  # in a subprocess: the driver itself never loads torch (see peak_rss_mb)
        prepared = json.loads(
            subprocess.run(
                [sys.executable, __file__, "prepare", name, "--workdir", str(args.workdir)],
                cwd=REPO,
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        print(
            f"prepared {name}: {prepared['parameters'] / 1e6:.1f}M parameters, sample {prepared['sample']}",
            flush=True,
        )
    commands = {
        "ours": [sys.executable, str(REPO / "bench" / "trainer_bench.py"), "child"],
        "trl": [args.trl_python, str(REPO / "bench" / "trl_bench.py")],
    }
    results: dict[str, dict[str, list[dict]]] = {
        name: {"ours": [], "trl": []} for name in configs
    }  # raw runs
    for repeat in range(args.repeats):
        order = ("ours", "trl") if repeat % 2 == 0 else ("trl", "ours")
        for name in configs:
            for side in order:
                out = args.workdir / name / f"result-{side}-{repeat}.json"
                out.unlink(missing_ok=True)
                load = os.getloadavg()[0]
                command = commands[side] + [
                    name,
                    "--workdir",
                    str(args.workdir),
                    "--out",
                    str(out),
                    "--steps",
                    str(args.steps or CONFIGS[name].steps),
                ]
                status, wall, rss = launch(command, env)
                if status != 0:
                    print(f"{side} {name} failed with status {status}", file=sys.stderr)
                    return 1
                run = {
                    **json.loads(out.read_text()),
                    "wall_s": wall,
                    "process_peak_rss_mb": rss,
                    "load_before": load,
                }
                results[name][side].append(run)
                summary = summarise(run["steps"][1:])
                print(
                    f"[repeat {repeat + 1}] {name:>16} {side:>4}: median {summary['median_s']:.3f} s/step "
                    f"(generate {summary['median_generate_s']:.3f}), {summary['tokens_per_s']:.0f} tok/s, "
                    f"peak RSS {run['steps'][-1]['peak_rss_mb']:.0f} MB (process {rss:.0f} MB), "
                    f"wall {wall:.0f} s, "
                    f"load before {load:.2f}",
                    flush=True,
                )
    for name in configs:
        print_table(name, results[name])
    if args.save:
        args.save.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
