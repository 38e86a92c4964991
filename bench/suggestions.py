"""Measured prototypes of the speed-ups that bench/RESULTS.md suggests for trainer/ (nothing here
is used by the trainer). CPU time on one thread, the prepared bench models, interleaved repeats.

    .venv/bin/python bench/suggestions.py [--workdir /tmp/grpo-bench] [--repeats 4]

1. sampling: ``torch.multinomial`` (what trainer/rollout.py's ``sample_top_p`` uses) against
   inverse-CDF sampling from the same probabilities;
2. generation: trainer.rollout.generate against a copy with (1), and with (1) plus dropping
   finished rows from the decode batch;
3. the chunked LM-head forward: trainer.logprobs' ``_ChunkedSelectedLogProbs`` against one
   exponential pass, with and without the entropy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_common import CONFIGS, prepare, quiet

from trainer.logprobs import _ChunkedSelectedLogProbs
from trainer.rollout import generate


def sample_multinomial(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)  # [N, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [N]


def sample_inverse_cdf(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The same distribution as ``sample_multinomial``: one uniform per row, found in the CDF."""
    cdf = torch.softmax(logits.float(), dim=-1).cumsum_(-1)  # [N, V]
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]  # [N, 1]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=cdf.shape[1] - 1)  # [N]


@torch.inference_mode()
def generate_variant(model, prompt_ids: list[torch.Tensor], *, group_size: int, max_new_tokens: int, eos_id: int,
                     pad_id: int, generator: torch.Generator, drop_finished: bool) -> list[torch.Tensor]:
    """trainer.rollout.generate with inverse-CDF sampling and, optionally, finished rows dropped
    from the batch once a quarter of the active rows have finished."""
    from transformers import DynamicCache

    batch, width = len(prompt_ids), max(p.shape[0] for p in prompt_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)  # [B, P] left-padded
    attention_mask = torch.zeros((batch, width), dtype=torch.long)  # [B, P]
    for b, prompt in enumerate(prompt_ids):
        input_ids[b, width - prompt.shape[0]:] = prompt
        attention_mask[b, width - prompt.shape[0]:] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache.batch_repeat_interleave(group_size)
    logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)  # [A, V], A = active rows
    attention_mask = attention_mask.repeat_interleave(group_size, dim=0)  # [A, P]
    next_position = position_ids[:, -1:].repeat_interleave(group_size, dim=0) + 1  # [A, 1]
    total = batch * group_size
    rows = torch.arange(total)  # [A] the sequence each active row belongs to
    tokens = torch.full((total, max_new_tokens), pad_id)  # [B*G, T]
    lengths = torch.full((total,), max_new_tokens)  # [B*G]
    finished = torch.zeros(total, dtype=torch.bool)  # [A]
    for t in range(max_new_tokens):
        token = sample_inverse_cdf(logits, generator).masked_fill(finished, pad_id)  # [A]
        tokens[rows, t] = token
        ended = (token == eos_id) & ~finished  # [A]
        lengths[rows[ended]] = t + 1
        finished |= ended
        if finished.all() or t + 1 == max_new_tokens:
            break
        if drop_finished and 4 * int(finished.sum()) >= finished.numel():
            keep = (~finished).nonzero().squeeze(-1)  # [A']
            cache.batch_select_indices(keep)
            rows, token, finished = rows[keep], token[keep], finished[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)  # [A, P+t]
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                    cache=cache, use_cache=True)
        logits = out.logits[:, -1]  # [A, V]
        next_position = next_position + 1
    return [tokens[i, :lengths[i]] for i in range(total)]


def lm_head_one_pass(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, entropy: bool):
    """log softmax(hidden @ weight.T)[target] (and the entropy) with a single exponential pass."""
    logits = hidden @ weight.T  # [n, V]
    top = logits.amax(-1, keepdim=True)  # [n, 1]
    e = (logits - top).exp_()  # [n, V]
    total = e.sum(-1)  # [n]
    lse = top.squeeze(-1) + total.log()  # [n]
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # [n]
    return logps, (lse - (e * logits).sum(-1) / total) if entropy else None


def cpu_seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return times


def compare_generation(name: str, workdir: Path, repeats: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prepared = prepare(CONFIGS[name], workdir)
    model = AutoModelForCausalLM.from_pretrained(prepared["model_dir"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(prepared["model_dir"])
    rows = [json.loads(line) for line in Path(prepared["dataset"]).read_text().splitlines()[:4]]
    prompts = [torch.tensor(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
    common = dict(group_size=8, max_new_tokens=64, pad_id=tokenizer.pad_token_id)
    variants = {
        "trainer.rollout.generate": lambda seed: generate(
            model, prompts, eos_token_ids=[tokenizer.eos_token_id], temperature=1.0, top_p=1.0,
            generator=torch.Generator().manual_seed(seed), **common).completion_ids,
        "+ inverse CDF": lambda seed: generate_variant(
            model, prompts, eos_id=tokenizer.eos_token_id, generator=torch.Generator().manual_seed(seed),
            drop_finished=False, **common),
        "+ drop finished rows": lambda seed: generate_variant(
            model, prompts, eos_id=tokenizer.eos_token_id, generator=torch.Generator().manual_seed(seed),
            drop_finished=True, **common),
    }
    results: dict[str, list[tuple[float, int]]] = {label: [] for label in variants}
    for seed in range(repeats):  # interleaved, so a busy spell hits every variant
        for label, fn in variants.items():
            started = time.process_time()
            completions = fn(seed)
            results[label].append((time.process_time() - started, sum(c.shape[0] for c in completions)))
    for label, runs in results.items():
        print(f"   {name:>15} {label:>24}: median {statistics.median(t for t, _ in runs):.2f} s "
              f"(runs {[round(t, 2) for t, _ in runs]}, completion tokens {[n for _, n in runs]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/grpo-bench"))
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(1)

    print("1. sampling one token for 32 rows (ms, median of 50)")
    generator = torch.Generator().manual_seed(0)
    for vocab in (32000, 101):
        logits = torch.randn(32, vocab)
        for name, fn in (("multinomial", sample_multinomial), ("inverse CDF", sample_inverse_cdf)):
            times = cpu_seconds(lambda fn=fn, logits=logits: fn(logits, generator), 50)
            print(f"   V={vocab:>5} {name:>12}: {statistics.median(times) * 1e3:.2f} ms")
    probs = torch.softmax(torch.tensor([0.1, 1.0, -1.0, 2.0, 0.0]), -1)
    draws = sample_inverse_cdf(probs.log().repeat(200_000, 1), generator)
    print(f"   inverse CDF frequencies {[round(x, 4) for x in (torch.bincount(draws, minlength=5) / 2e5).tolist()]}"
          f" vs probabilities {[round(x, 4) for x in probs.tolist()]}")

    print("2. generation, 4 prompts x 8 completions, <= 64 tokens (CPU s per call)")
    for name in ("realistic", "realistic-small"):
        compare_generation(name, args.workdir, args.repeats)

    print("3. LM-head forward, 1000 tokens x 32000 vocabulary x 256 hidden (ms, median)")
    hidden, weight = torch.randn(1000, 256) / 16, torch.randn(32000, 256) * 0.02
    targets = torch.randint(0, 32000, (1000,))
    current = _ChunkedSelectedLogProbs.apply(hidden, weight, targets, 1.0, 1024)
    fused = lm_head_one_pass(hidden, weight, targets, entropy=True)
    for label, fn in (("trainer (logsumexp + entropy pass)", lambda: _ChunkedSelectedLogProbs.apply(
                          hidden, weight, targets, 1.0, 1024)),
                      ("one exponential pass", lambda: lm_head_one_pass(hidden, weight, targets, True)),
                      ("one pass, no entropy (reference)", lambda: lm_head_one_pass(hidden, weight, targets, False)),
                      ("the matmul alone", lambda: hidden @ weight.T)):
        print(f"   {label:>35}: {statistics.median(cpu_seconds(fn, args.repeats + 1)) * 1e3:.0f} ms")
    print(f"   max |diff| one pass vs trainer: log-probs {(current[0] - fused[0]).abs().max().item():.1e}, "
          f"entropy {(current[1] - fused[1]).abs().max().item():.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
