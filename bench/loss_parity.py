"""Loss parity: one fixed batch through TRL's GRPOTrainer loss and through ours, per loss_type.

    .venv-bench/bin/python bench/loss_parity.py

The batch: 3 prompts of different lengths (TRL left-pads them), G = 4 completions each of varied
lengths (TRL right-pads them), advantages from rewards that leave one group zero-std, and
"old" and reference log-probs that differ from the current ones by up to +-0.5 nats, so that the
clip and the KL term both act. TRL's side is ``GRPOTrainer._compute_loss(model, inputs)`` with
the inputs dict ``_generate_and_score_completions`` builds; ours is what trainer/loop.py's
``optimize`` does for one micro-batch holding the whole step: ``token_logprobs`` ->
``clipped_token_loss`` -> ``aggregate_loss``. Both run on the same float32 model (TRL's fused LM
head patches only its own ``fused_lm_head=True`` calls). Printed per case: both losses, their
difference, and the largest difference between the two parameter gradients.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from bench_common import quiet  # also puts the checkout on sys.path

from trainer.logprobs import Group, token_logprobs
from trainer.loss import aggregate_loss, clipped_token_loss, group_advantages
from trainer.tiny import make_tiny_model

G = 4
PROMPT_LENGTHS = (7, 12, 10)
COMPLETION_LENGTHS = (5, 1, 9, 3, 7, 9, 2, 6, 4, 4, 8, 1)  # B*G, longest = 9
REWARDS = (1.0, 0.0, 0.5, 0.0, 0.2, 0.9, 0.9, 0.1, 1.0, 1.0, 1.0, 1.0)  # the last group is zero-std
MAX_COMPLETION_LENGTH = 12  # the dr_grpo denominator
BETA, EPSILON, EPSILON_HIGH = 0.04, 0.2, 0.28
CHUNK_SIZE = 7  # our LM-head chunk, small so the batch spans several chunks


def make_batch(vocab: int, pad_id: int, generator: torch.Generator) -> dict:
    prompts = [torch.randint(4, vocab, (n,), generator=generator) for n in PROMPT_LENGTHS]  # B x [P_b]
    completions = [
        torch.randint(4, vocab, (n,), generator=generator) for n in COMPLETION_LENGTHS
    ]  # B*G x [L_i]
    width_p, width_c = max(PROMPT_LENGTHS), max(COMPLETION_LENGTHS)
    prompt_ids = torch.full(
        (len(completions), width_p), pad_id
    )  # [B*G, P] left-padded, one row per completion
    prompt_mask = torch.zeros((len(completions), width_p), dtype=torch.long)  # [B*G, P]
    completion_ids = torch.full((len(completions), width_c), pad_id)  # [B*G, C] right-padded
    completion_mask = torch.zeros((len(completions), width_c), dtype=torch.long)  # [B*G, C]
    for i, completion in enumerate(completions):
        prompt = prompts[i // G]
        prompt_ids[i, width_p - len(prompt) :], prompt_mask[i, width_p - len(prompt) :] = prompt, 1
        completion_ids[i, : len(completion)], completion_mask[i, : len(completion)] = completion, 1
    noise = lambda: (torch.rand(completion_ids.shape, generator=generator) - 0.5) * completion_mask  # noqa: E731  [B*G, C]
    advantages, _ = group_advantages(torch.tensor(REWARDS), G)  # [B*G]
    return {
        "prompts": prompts,
        "completions": completions,
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_noise": noise(),
        "ref_noise": noise(),
    }


def trl_trainer(
    model,
    tokenizer,
    *,
    loss_type: str,
    level: str,
    temperature: float,
    output_dir: str,
    bias_corrected_kl: bool = False,
):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=len(COMPLETION_LENGTHS),
        num_generations=G,
        max_completion_length=MAX_COMPLETION_LENGTH,
        beta=BETA,
        epsilon=EPSILON,
        epsilon_high=EPSILON_HIGH,
        loss_type=loss_type,
        importance_sampling_level=level,
        temperature=temperature,
        # TRL 1.16 multiplies the KL by the ratio by default; ours: plain k3
        use_bias_correction_kl=bias_corrected_kl,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "x"}] * 8),
        processing_class=tokenizer,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; one micro-batch per step here
    return trainer


def our_logprobs(model, groups: list[Group], *, pad_id: int, temperature: float) -> torch.Tensor:
    """Per-token log-probs [N] as trainer/loop.py's ``optimize`` computes them (``pad_id`` unused:
    token_logprobs pads with its own)."""
    nested = token_logprobs(
        model,
        [g.prompt for g in groups],
        [g.completions for g in groups],
        temperature=temperature,
        chunk_size=CHUNK_SIZE,
    )
    return torch.cat([t for group in nested for t in group])


def gradients(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def compare(
    model,
    tokenizer,
    batch: dict,
    *,
    loss_type: str,
    level: str,
    temperature: float,
    with_old: bool,
    output_dir: str,
    bias_corrected_kl: bool = False,
) -> dict:
    trainer = trl_trainer(
        model,
        tokenizer,
        loss_type=loss_type,
        level=level,
        temperature=temperature,
        output_dir=output_dir,
        bias_corrected_kl=bias_corrected_kl,
    )
    model = trainer.model
    pad_id, mask = tokenizer.pad_token_id, batch["completion_mask"].bool()  # [B*G, C]
    seq_index = torch.repeat_interleave(
        torch.arange(len(COMPLETION_LENGTHS)), torch.tensor(COMPLETION_LENGTHS)
    )  # [N]
    groups = [
        Group(prompt=p, completions=batch["completions"][b * G : (b + 1) * G])
        for b, p in enumerate(batch["prompts"])
    ]

    with torch.no_grad():  # the current log-probs, from which the old and reference ones are offset
        current = our_logprobs(model, groups, pad_id=pad_id, temperature=temperature)  # [N]
    padded = torch.zeros(mask.shape).masked_scatter(mask, current)  # [B*G, C]
    old = (padded + batch["old_noise"]) if with_old else None  # [B*G, C]
    ref = padded + batch["ref_noise"]  # [B*G, C]

    model.zero_grad(set_to_none=True)
    inputs = {
        key: batch[key]
        for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
    }
    inputs.update(ref_per_token_logps=ref, num_items_in_batch=mask.sum())
    if old is not None:
        inputs["old_per_token_logps"] = old
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = gradients(model)

    model.zero_grad(set_to_none=True)
    logps = our_logprobs(model, groups, pad_id=pad_id, temperature=temperature)  # [N]
    terms = clipped_token_loss(
        logps,
        old[mask] if old is not None else logps.detach(),
        batch["advantages"][seq_index],
        seq_index,
        len(COMPLETION_LENGTHS),
        epsilon=EPSILON,
        epsilon_high=EPSILON_HIGH,
        beta=BETA,
        ref_logps=ref[mask],
        importance_sampling_level=level,
    )
    our_loss = aggregate_loss(
        terms.loss,
        seq_index,
        len(COMPLETION_LENGTHS),
        loss_type,
        num_sequences=len(COMPLETION_LENGTHS),
        num_tokens=int(mask.sum()),
        max_completion_length=MAX_COMPLETION_LENGTH,
    )
    our_loss.backward()
    our_grads = gradients(model)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(trl_grads, our_grads, strict=True))
    grad_scale = max(a.abs().max().item() for a in trl_grads)
    clipped = (terms.low_clipped | terms.high_clipped).float().mean().item()
    return {
        "trl": trl_loss.item(),
        "ours": our_loss.item(),
        "grad_diff": grad_diff,
        "grad_scale": grad_scale,
        "clipped": clipped,
    }


def logprob_check(model_dir: Path, tokenizer, batch: dict, output_dir: str) -> str:
    """Per-token log-probs three ways: TRL's fused-head forward, ours, and a plain
    ``log_softmax(model(prompt + completion).logits)`` for each sequence alone (no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trl_trainer(
        model, tokenizer, loss_type="dapo", level="token", temperature=1.0, output_dir=output_dir
    )
    model, mask = trainer.model, batch["completion_mask"].bool()  # [B*G, C]
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)  # [B*G, P+C]
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)  # [B*G, P+C]
        trl, _, _ = trainer._get_per_token_logps_and_entropies(
            model, ids, attention, mask.shape[1]
        )  # [B*G, C]
        groups = [
            Group(prompt=p, completions=batch["completions"][b * G : (b + 1) * G])
            for b, p in enumerate(batch["prompts"])
        ]
        ours = our_logprobs(model, groups, pad_id=tokenizer.pad_token_id, temperature=1.0)  # [N]
        plain = []
        for i, completion in enumerate(batch["completions"]):
            prompt = batch["prompts"][i // G]
            logits = model(input_ids=torch.cat([prompt, completion])[None]).logits[
                0, len(prompt) - 1 : -1
            ]  # [L, V]
            plain.append(logits.log_softmax(-1).gather(-1, completion[:, None]).squeeze(-1))  # [L]
        plain = torch.cat(plain)  # [N]
    return (
        f"per-token log-probs, max |diff|: TRL vs ours {(trl[mask] - ours).abs().max().item():.1e}, "
        f"ours vs plain {(ours - plain).abs().max().item():.1e}, "
        f"TRL vs plain {(trl[mask] - plain).abs().max().item():.1e}"
    )


def main() -> int:
    quiet()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = make_tiny_model(
            Path(tmp) / "model", hidden_size=64, num_layers=2, num_heads=4, vocab_size=300
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        batch = make_batch(len(tokenizer), tokenizer.pad_token_id, torch.Generator().manual_seed(0))
        print(
            f"batch: prompts {PROMPT_LENGTHS} tokens, G={G}, completions {COMPLETION_LENGTHS} tokens, "
            f"beta={BETA}, epsilon=({EPSILON}, {EPSILON_HIGH}), vocab {len(tokenizer)}, float32\n"
        )
        print(
            "| loss_type | IS level | T | old logps | TRL loss | our loss | |diff| "
            "| max |grad diff| (max |grad|) | clipped |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        worst = 0.0
        cases = [(lt, "token", 1.0, True) for lt in ("dapo", "bnpo", "grpo", "dr_grpo")]
        cases += [
            ("dapo", "token", 1.0, False),
            ("dapo", "sequence", 1.0, True),
            ("grpo", "sequence", 0.7, True),
            ("dapo", "token", 0.7, True),
        ]
        for loss_type, level, temperature, with_old in cases:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32
            )  # fresh: TRL patches it
            r = compare(
                model,
                tokenizer,
                batch,
                loss_type=loss_type,
                level=level,
                temperature=temperature,
                with_old=with_old,
                output_dir=str(Path(tmp) / "trl"),
            )
            diff = abs(r["trl"] - r["ours"])
            worst = max(worst, diff)
            print(
                f"| {loss_type} | {level} | {temperature} | {'offset' if with_old else 'current (mu=1)'} | "
                f"{r['trl']:.9f} | {r['ours']:.9f} | {diff:.1e} | "
                f"{r['grad_diff']:.1e} ({r['grad_scale']:.1e}) | {r['clipped']:.2f} |"
            )
        print(f"\nlargest loss difference: {worst:.2e}")
        print(logprob_check(model_dir, tokenizer, batch, str(Path(tmp) / "trl")))
        # TRL 1.16's default multiplies the KL term by the importance ratio (DeepSeek-V3.2's unbiased KL);
        # ours has no such option, so the benchmark turns it off. What it changes, for the record:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        r = compare(
            model,
            tokenizer,
            batch,
            loss_type="dapo",
            level="token",
            temperature=1.0,
            with_old=True,
            output_dir=str(Path(tmp) / "trl"),
            bias_corrected_kl=True,
        )
        print(
            f"with TRL's default use_bias_correction_kl=True (dapo, token, offset old logps): "
            f"TRL {r['trl']:.9f} vs ours {r['ours']:.9f}, |diff| {abs(r['trl'] - r['ours']):.1e}, "
            f"max |grad diff| {r['grad_diff']:.1e}"
        )
        return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
