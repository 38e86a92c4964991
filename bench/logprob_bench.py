"""One group's forward + backward through each way of scoring completions, at growing lengths.

    .venv/bin/python bench/logprob_bench.py [--lengths 64,512,1024] [--repeats 2] [--threads 1]
        [--paths old-packed,shared-prompt,rows,auto,plain]

The realistic benchmark model's shape (bench_common "realistic": Llama, hidden 256, 8 layers, 8
heads, 32k vocabulary, ~24M parameters; random init, fp32, sdpa), one group: a 100-token prompt
and G = 8 completions of the given length. Paths:

- old-packed: the trainer's former scoring: one row [prompt, c_1..c_8] with a dense [S, S]
  additive mask through the decoder, the chunked LM head (kept here for comparison only; it
  drops sliding windows and logit transforms, see issue 11);
- shared-prompt: the prompt once with its KV cache in the graph, repeated for the 8 completions,
  whatever the lengths, the chunked LM head (what ``token_logprobs`` did before issue 11's rule);
- rows: ``token_logprobs`` one row [prompt, c_i] per completion, the chunked LM head;
- auto: ``token_logprobs`` as the trainer runs it (``Scoring()``): the prompt shared where
  ``shares_prompt`` says it pays, else rows;
- plain: the naive computation, one row per completion through the model's own forward and full
  [8, S, V] logits (what TRL does).

Prints the best of ``--repeats`` seconds of forward + backward per path and length, wall clock
and, in parentheses, this process's CPU time (with one thread, what the wall clock would be
without other work on the machine).
"""

from __future__ import annotations

import argparse
import time

import torch

from trainer.logprobs import PLAIN, Scoring, _shared_prompt_hidden, selected_logprobs, token_logprobs

PROMPT, G = 100, 8


def realistic_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=16384,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def old_packed_logprobs(model, prompt: torch.Tensor, completions: list[torch.Tensor]) -> torch.Tensor:
    """The former pack_groups + completion_logprobs for one group. -> [N]"""
    plen, total = prompt.shape[0], prompt.shape[0] + sum(c.shape[0] for c in completions)
    ids = torch.cat([prompt, *completions])[None]  # [1, S]
    positions = torch.cat(
        [torch.arange(plen)] + [torch.arange(plen, plen + c.shape[0]) for c in completions]
    )[None]
    allowed = torch.zeros(total, total, dtype=torch.bool)  # [S, S] query x key
    allowed[:plen, :plen] = torch.ones(plen, plen, dtype=torch.bool).tril()
    start, before = plen, []
    for c in completions:
        end = start + c.shape[0]
        allowed[start:end, :plen] = True
        allowed[start:end, start:end] = torch.ones(c.shape[0], c.shape[0], dtype=torch.bool).tril()
        before.append(torch.cat([torch.tensor([plen - 1]), torch.arange(start, end - 1)]))
        start = end
    mask = torch.zeros(1, 1, total, total).masked_fill_(
        ~allowed, torch.finfo(torch.float32).min
    )  # [1, 1, S, S]
    hidden = model.model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
    ).last_hidden_state
    hidden = hidden[0][torch.cat(before)]  # [N, H]
    logps, _ = selected_logprobs(hidden, model.lm_head, torch.cat(completions), with_entropy=False)
    return logps


def shared_prompt_logprobs(model, prompt: torch.Tensor, completions: list[torch.Tensor]) -> torch.Tensor:
    """``token_logprobs`` with the prompt shared whatever the lengths. -> [N]"""
    hidden = _shared_prompt_hidden(model.model, [prompt], [completions], 8192)  # [N, H]
    logps, _ = selected_logprobs(hidden, model.lm_head, torch.cat(completions), with_entropy=False)
    return logps


def scorer(path: str):
    if path == "old-packed":
        return old_packed_logprobs
    if path == "shared-prompt":
        return shared_prompt_logprobs
    scoring = {"auto": Scoring(), "rows": Scoring(share_prompt=False), "plain": PLAIN}[path]

    def score(model, prompt, completions):
        return torch.cat(token_logprobs(model, [prompt], [completions], scoring=scoring)[0])

    return score


def time_path(model, path: str, length: int, repeats: int) -> tuple[float, float]:
    """The best of ``repeats`` (wall seconds, CPU seconds) of one group's forward + backward."""
    g = torch.Generator().manual_seed(length)
    prompt = torch.randint(3, 32000, (PROMPT,), generator=g)
    completions = [torch.randint(3, 32000, (length,), generator=g) for _ in range(G)]
    score, wall, cpu = scorer(path), float("inf"), float("inf")
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        started, started_cpu = time.perf_counter(), time.process_time()
        score(model, prompt, completions).sum().backward()
        wall = min(wall, time.perf_counter() - started)
        cpu = min(cpu, time.process_time() - started_cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="64,512,1024")
    parser.add_argument("--paths", default="old-packed,shared-prompt,rows,auto,plain")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = realistic_model().train()
    paths = args.paths.split(",")
    print(
        f"one group fwd+bwd, prompt {PROMPT}, G={G}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{args.threads} thread(s), best of {args.repeats}: seconds"
    )
    ours = "auto" if "auto" in paths else "shared-prompt"
    print(f"{'L':>6} " + " ".join(f"{p:>16}" for p in paths) + f"   plain / {ours} (wall, CPU)")
    time_path(model, "shared-prompt", 16, 1)  # warm-up
    for length in map(int, args.lengths.split(",")):
        seconds = {p: time_path(model, p, length, args.repeats) for p in paths}
        ratios = (
            " ".join(f"{seconds['plain'][k] / seconds[ours][k]:.2f}x" for k in (0, 1))
            if {"plain", ours} <= seconds.keys()
            else ""
        )
        cells = " ".join(f"{f'{wall:.2f} ({cpu:.2f})':>16}" for wall, cpu in seconds.values())
        print(f"{length:>6} {cells}   {ratios}", flush=True)


if __name__ == "__main__":
    main()
