"""Sampling alone: the vLLM sampler (``trainer.generation.vllm``) against our Hugging Face path
(``trainer.rollout.generate``), on the realistic 24M-parameter / 32k-vocabulary Llama.

    OMP_NUM_THREADS=1 .venv/bin/python bench/vllm_bench.py [--runs realistic:64,long-1024:1024]
        [--prompts 4] [--repeats 2] [--threads 1] [--workdir /tmp/grpo-bench]

Each run is CONFIG:LENGTH: the bench config whose model samples (``bench_common``: "realistic"
stops at EOS after about 25 tokens on average, the long-* models never do, so every completion
runs to the length), ``--prompts`` prompts of its dataset x G = 8, T = 1, top_p = 1, as a GRPO
step samples them. Both sides get ``--threads`` threads: ours in this process, vLLM's engine in
its worker (``make vllm-setup`` builds the environment it runs in). The two sides alternate, and
swap who goes first on every repeat, after one warm-up call each; the table gives, per call,
the mean seconds and CPU seconds of each side (vLLM's: its server process and any children,
read from /proc, plus this process's share) and its tokens per second over all repeats (the
completions' tokens: with EOS the two sides sample different lengths). It also gives the engine's
start-up time and one full-weight sync's (``VLLMSampler.sync``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench_common import CONFIGS, prepare, quiet


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its descendants so far (Linux /proc)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            total += (int(stats[current][11]) + int(stats[current][12])) / tick  # utime, stime
        todo.extend(children.get(current, []))
    return total


def bench_run(name: str, length: int, args: argparse.Namespace) -> dict:
    """One CONFIG:LENGTH run: both sides timed, the engine's start and one sync too."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.config import GRPOConfig
    from trainer.generation.vllm import VLLMSampler
    from trainer.rollout import generate

    config = CONFIGS[name]
    prepared = prepare(config, args.workdir)
    model = AutoModelForCausalLM.from_pretrained(prepared["model_dir"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(prepared["model_dir"])
    rows = [json.loads(line) for line in Path(prepared["dataset"]).read_text().splitlines()]
    prompt_ids = [
        torch.tensor(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
        for r in rows[: args.prompts]
    ]
    settings = dict(
        group_size=config.group_size,
        max_new_tokens=length,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        temperature=1.0,
        top_p=1.0,
    )
    job = GRPOConfig(
        max_prompt_length=max(p.shape[0] for p in prompt_ids), max_completion_length=length, seed=0
    )
    started = time.perf_counter()
    sampler = VLLMSampler(job, model, threads=args.threads)
    record = {"name": name, "length": length, "start_s": time.perf_counter() - started}
    engine_pid = sampler.engine.process.pid

    def ours(seed: int) -> tuple[int, float]:
        cpu = time.process_time()
        rollout = generate(model, prompt_ids, generator=torch.Generator().manual_seed(seed), **settings)
        return sum(c.shape[0] for c in rollout.completion_ids), time.process_time() - cpu

    def vllm(seed: int) -> tuple[int, float]:
        cpu = tree_cpu_seconds(engine_pid) + time.process_time()
        rollout = sampler.generate(prompt_ids, generator=torch.Generator().manual_seed(seed), **settings)
        return sum(c.shape[0] for c in rollout.completion_ids), tree_cpu_seconds(
            engine_pid
        ) + time.process_time() - cpu

    try:
        started = time.perf_counter()
        sampler.sync(model)
        record["sync_s"] = time.perf_counter() - started
        sides = {"hf": ours, "vllm": vllm}
        for side in sides.values():
            side(100)  # warm-up
        for repeat in range(args.repeats):
            for side in list(sides) if repeat % 2 == 0 else list(sides)[::-1]:
                started = time.perf_counter()
                tokens, cpu = sides[side](repeat)
                seconds = time.perf_counter() - started
                print(
                    f"  {name} L={length} {side:>4}: {seconds:.2f} s, CPU {cpu:.2f} s, {tokens} tokens",
                    flush=True,
                )
                totals = record.setdefault(side, [0.0, 0, 0.0])
                totals[0], totals[1], totals[2] = totals[0] + seconds, totals[1] + tokens, totals[2] + cpu
    finally:
        sampler.close()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--runs", default="realistic:64,long-1024:1024", help="CONFIG:LENGTH, comma-separated"
    )
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/grpo-bench"))
    args = parser.parse_args(argv)

    import torch

    quiet()
    torch.set_num_threads(args.threads)
    records = []
    for run in args.runs.split(","):
        name, length = run.split(":")
        records.append(bench_run(name, int(length), args))

    n = args.repeats
    print(f"\nthreads {args.threads}, {args.prompts} prompts x G=8, T=1, top_p=1; per call, mean of {n}")
    print(
        f"{'config':<12}{'L':>6}{'tokens':>8}{'HF s':>8}{'HF CPU s':>10}{'HF tok/s':>10}{'vLLM s':>8}"
        f"{'vLLM CPU s':>12}{'vLLM tok/s':>12}{'tok/s ratio':>12}{'start s':>9}{'sync s':>8}"
    )
    for r in records:
        (hs, ht, hc), (vs, vt, vc) = r["hf"], r["vllm"]
        print(
            f"{r['name']:<12}{r['length']:>6}{(ht + vt) / (2 * n):>8.0f}{hs / n:>8.2f}{hc / n:>10.2f}"
            f"{ht / hs:>10.0f}{vs / n:>8.2f}{vc / n:>12.2f}{vt / vs:>12.0f}{(vt / vs) / (ht / hs):>11.2f}x"
            f"{r['start_s']:>9.1f}{r['sync_s']:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
