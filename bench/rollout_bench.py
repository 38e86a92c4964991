"""Sampling alone: our rollout (``trainer.rollout.generate``) against Hugging Face ``generate`` on
the same model, at long completions.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rollout_bench.py [--lengths 256,1024,2048] [--repeats 2]
        [--config long-256] [--workdir /tmp/grpo-bench] [--profile]

The model is a long-* bench config's (``bench_common``: the realistic 24M/32k Llama whose EOS
never comes, so every completion runs to the length); 2 prompts of the dataset, G = 8, T = 1,
top_p = 1. HF's side is ``model.generate(do_sample=True, num_return_sequences=G,
max_new_tokens=L, top_k=0)`` on the two prompts left-padded, as TRL calls it. The two sides
alternate (and swap who goes first on every repeat) so a busy neighbour slows both; the table
gives the faster of the repeats per side. ``--profile`` adds a torch profiler table of one of
our runs at the first length.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_common import CONFIGS, prepare, quiet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="256,1024,2048")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--config", default="long-256", help="a long-* config: whose model to sample from")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/grpo-bench"))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--no-hf", action="store_true", help="skip HF generate (with --plain-cache-too: ours A/B)"
    )
    parser.add_argument(
        "--plain-cache-too",
        action="store_true",
        help="also time our rollout on transformers' own DynamicCache (the rollout before GrowingLayer)",
    )
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from trainer import rollout
    from trainer.rollout import generate

    quiet()
    config = CONFIGS[args.config]
    prepared = prepare(config, args.workdir)
    model = AutoModelForCausalLM.from_pretrained(prepared["model_dir"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(prepared["model_dir"])
    rows = [json.loads(line) for line in Path(prepared["dataset"]).read_text().splitlines()[:2]]
    prompt_ids = [torch.tensor(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
    G, eos, pad = config.group_size, tokenizer.eos_token_id, tokenizer.pad_token_id

    width = max(p.shape[0] for p in prompt_ids)
    padded = torch.full((len(prompt_ids), width), pad)  # [B, P] left-padded, as TRL's processor does
    mask = torch.zeros_like(padded)
    for b, p in enumerate(prompt_ids):
        padded[b, width - p.shape[0] :], mask[b, width - p.shape[0] :] = p, 1

    def ours(length: int) -> int:
        rollout = generate(
            model,
            prompt_ids,
            group_size=G,
            max_new_tokens=length,
            eos_token_ids=[eos],
            pad_id=pad,
            temperature=1.0,
            top_p=1.0,
            generator=torch.Generator().manual_seed(0),
        )
        return sum(c.shape[0] for c in rollout.completion_ids)

    def hf(length: int) -> int:
        torch.manual_seed(0)
        with torch.inference_mode():
            out = model.generate(
                padded,
                attention_mask=mask,
                do_sample=True,
                num_return_sequences=G,
                max_new_tokens=length,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        return int((out[:, width:] != pad).sum())

    def ours_plain_cache(length: int) -> int:
        growing, rollout.new_cache = rollout.new_cache, lambda model, _: DynamicCache(config=model.config)
        try:
            return ours(length)
        finally:
            rollout.new_cache = growing

    sides = {
        "ours": ours,
        **({} if args.no_hf else {"hf": hf}),
        **({"plain": ours_plain_cache} if args.plain_cache_too else {}),
    }
    print(f"threads {torch.get_num_threads()}, prompts {[p.shape[0] for p in prompt_ids]}, G {G}", flush=True)
    for length in (int(x) for x in args.lengths.split(",")):
        best = {}
        for repeat in range(args.repeats):
            for side in list(sides) if repeat % 2 == 0 else list(sides)[::-1]:
                started, started_cpu = time.perf_counter(), time.process_time()
                tokens = sides[side](length)
                seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
                best[side] = min(best.get(side, float("inf")), seconds)
                print(
                    f"  L={length} {side:>5}: {seconds:.2f} s, CPU {cpu:.2f} s ({tokens} tokens)", flush=True
                )
        print(
            f"L={length}: ours {best['ours']:.2f} s"
            + (
                f", HF generate {best['hf']:.2f} s, HF/ours {best['hf'] / best['ours']:.2f}x"
                if "hf" in best
                else ""
            )
            + (f"; ours on DynamicCache {best['plain']:.2f} s" if "plain" in best else ""),
            flush=True,
        )
        if args.profile:
            args.profile = False
            with torch.profiler.profile() as prof:
                ours(length)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
