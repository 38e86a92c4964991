"""Demo set-up: a task that takes a skill, and a tiny model that has a little of it.

The task is sorting letters ("sort dbca: " -> "abcd"; 3 to 5 letters from a to j, about 111,000
distinct problems). It is a skill, not a table: the model trains (warm start and GRPO) on 2,000
problems and is measured on others it never sees, 256 that the job evaluates every checkpoint on
to choose the best one, and 500 more, held out from everything, for the figure the demo reports.
A rise on them can only come from sorting better, not from remembering answers.

A random-init model never sorts, so GRPO would have nothing to reinforce. A short supervised pass
(SFT on prompt -> answer) warm-starts it and stops as soon as it sorts a fifth of a probe of
training problems (40 to 80 steps): right often enough to give GRPO signal, wrong often enough
to leave it room. Everything is cached under the output directory, per seed; a second run
reuses it.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.tiny import make_tiny_model

log = logging.getLogger("demo")
LETTERS = "abcdefghij"
MIN_LETTERS, MAX_LETTERS = 3, 5
MAX_NEW_TOKENS = MAX_LETTERS + 1  # the answer and its end-of-sequence token
SPLITS = {"heldout": 500, "eval": 256, "train": 2000}  # drawn in this order, no prompt in two splits
WARM_TARGET = 0.2  # the warm start stops once the model sorts this share of the probe
WARM_PROBE = 128  # training problems the warm start checks itself on, every 5 steps
WARM_MAX_STEPS = 300


def problem(rng: random.Random) -> dict[str, str]:
    letters = "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS)))
    return {"prompt": f"sort {letters}: ", "answer": "".join(sorted(letters))}


def write_datasets(root: Path, seed: int = 0) -> dict[str, Path]:
    """``train.jsonl`` (warm start and GRPO), ``eval.jsonl`` (the job's eval set) and
    ``heldout.jsonl`` (the reported figure): distinct problems, none in two files."""
    rng, seen, paths = random.Random(seed), set(), {}
    for name, size in SPLITS.items():
        chosen: list[dict[str, str]] = []
        while len(chosen) < size:
            row = problem(rng)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                chosen.append(row)
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in chosen))
    return paths


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.inference_mode()
def greedy_accuracy(model, tokenizer, problems: list[dict]) -> float:
    """Share of ``problems`` whose greedy completion is exactly the answer (what the job's
    ``exact_match`` reward with ``extract: full`` scores 1)."""
    was_training = model.training
    model.eval()
    right = 0
    for start in range(0, len(problems), 100):
        batch = problems[start : start + 100]
        enc = tokenizer([p["prompt"] for p in batch], return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(
            **enc,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        right += sum(text.strip() == p["answer"] for p, text in zip(batch, texts, strict=True))
    model.train(was_training)
    return right / len(problems)


def accuracy(model_dir: Path, data: Path) -> float:
    """Greedy accuracy of the model saved in ``model_dir`` on every problem in ``data``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return greedy_accuracy(model, AutoTokenizer.from_pretrained(model_dir), rows(data))


def warm_start(base: Path, train: Path, output: Path, *, seed: int = 0) -> Path:
    """Supervised passes on prompt -> answer<eos> (loss on the answer tokens only) until the model
    sorts ``WARM_TARGET`` of the probe: stopping on competence rather than after a fixed number of
    steps gives every seed the same starting point (a fixed count leaves some at 2%, others at 40%)."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    problems = rows(train)
    examples = []
    for row in problems:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt, answer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for step in range(1, WARM_MAX_STEPS + 1):
        batch = rng.sample(examples, 64)
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for i, (p, a) in enumerate(batch):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0:
            probe = greedy_accuracy(model, tokenizer, problems[:WARM_PROBE])
            log.info(
                "   warm-start step %d: loss %.3f, sorts %.0f%% of the probe", step, loss.item(), 100 * probe
            )
            if probe >= WARM_TARGET:
                break
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def prepare(root: Path, *, seed: int = 0) -> dict[str, Path]:
    """Build (or reuse) the demo's data under ``root`` and its warm-started model for ``seed``."""
    root.mkdir(parents=True, exist_ok=True)
    paths = write_datasets(root)
    warm = root / f"sort-seed-{seed}" / "warm-model"
    if not (warm / "config.json").exists():
        base = make_tiny_model(
            root / f"sort-seed-{seed}" / "base-model", hidden_size=128, num_layers=4, num_heads=4, seed=seed
        )
        warm_start(base, paths["train"], warm, seed=seed)
    return {"model": warm, **paths}


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    paths = prepare(
        Path(sys.argv[1] if len(sys.argv) > 1 else ".demo"), seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0
    )
    print({k: str(v) for k, v in paths.items()})
    print("held-out accuracy", accuracy(paths["model"], paths["heldout"]))
