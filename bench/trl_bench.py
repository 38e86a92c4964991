"""TRL's side of the trainer benchmark: GRPOTrainer on a bench config, with settings matched to
ours (see bench/trainer_bench.py, which launches this in ``.venv-bench``).

    .venv-bench/bin/python bench/trl_bench.py CONFIG --workdir W --out RESULT.json --steps N

Matching, setting by setting (TRL 1.16 GRPOConfig; ours in trainer_bench.spec_for):
one optimizer step = one generation of prompts_per_step x G completions in one forward/backward
(per_device_train_batch_size = P*G, gradient_accumulation_steps = 1, so steps_per_generation = 1
and old log-probs are the current ones detached, as ours with num_iterations = 1); constant LR,
no warm-up, AdamW (torch) with betas (0.9, 0.99), weight decay 0, grad-norm clip 1.0; float32
(bf16/fp16 off: GRPOConfig turns bf16 on by default), no gradient checkpointing (on by default
in GRPOConfig), temperature 1, top_p 1, top_k 0; loss_type, beta, epsilon and scale_rewards as
ours; the KL is the plain k3 term on both sides (use_bias_correction_kl off: TRL 1.16 turns it
on by default and ours does not have it); no vLLM, no saving, no reporting, logging every step so
the loss can be read.
TRL 1.16 has no max_prompt_length: the prompts are shorter than ours (512) so neither truncates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench_common import CONFIGS, StepRecord, peak_rss_mb, prepare, quiet, regex_match_rewards, write_result


def run_trl(config_name: str, workdir: Path, out: Path, steps: int) -> None:
    import json

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    quiet()
    config = CONFIGS[config_name]
    prepared = prepare(config, workdir)
    rows = [json.loads(line) for line in Path(prepared["dataset"]).read_text().splitlines() if line.strip()]
    model = AutoModelForCausalLM.from_pretrained(prepared["model_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(prepared["model_dir"])

    def reward(prompts, completions, **_):
        return regex_match_rewards(config.reward_pattern, completions)

    reward.__name__ = "regex"
    batch = config.prompts_per_step * config.group_size
    args = GRPOConfig(
        output_dir=str(workdir / config.name / "trl"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=config.group_size,
        max_completion_length=config.max_completion_length,
        max_steps=steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.99,
        weight_decay=0.0,
        max_grad_norm=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=config.beta,
        epsilon=config.epsilon,
        num_iterations=1,
        loss_type=config.loss_type,
        scale_rewards="group",
        use_bias_correction_kl=False,  # TRL 1.16 defaults to KL x ratio; ours is the plain k3 term
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        use_vllm=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        seed=config.seed,
    )

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.logs: list[dict] = []
            self.ends: list[tuple[float, float, float]] = []  # (time, CPU time, ru_maxrss) at each step's end
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_train_begin(self, *_, **__):
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            self.ends.append((time.perf_counter(), time.process_time(), peak_rss_mb()))

        def on_log(self, _args, state, _control, logs=None, **__):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    recorder = Recorder()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    generate_seconds = [0.0]  # one generation per optimizer step here (steps_per_generation = 1)
    generate_single_turn = trainer._generate_single_turn

    def timed_generate(*a, **k):
        started = time.perf_counter()
        try:
            return generate_single_turn(*a, **k)
        finally:
            generate_seconds.append(time.perf_counter() - started)

    trainer._generate_single_turn = timed_generate
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the recorder keeps them
    trainer.train()

    records, last, last_cpu, seen = [], recorder.start, recorder.start_cpu, 0.0
    for step, ((ended, cpu, rss), logs) in enumerate(zip(recorder.ends, recorder.logs, strict=True), start=1):
        records.append(
            StepRecord(
                step=step,
                seconds=ended - last,
                generate_seconds=generate_seconds[step],
                cpu_seconds=cpu - last_cpu,
                tokens=round(logs["num_tokens"] - seen),
                loss=logs["loss"],
                reward=logs["reward"],
                frac_reward_zero_std=logs["frac_reward_zero_std"],
                completion_length=logs["completions/mean_length"],
                kl=logs.get("kl", 0.0),
                peak_rss_mb=rss,
            )
        )
        last, last_cpu, seen = ended, cpu, logs["num_tokens"]
    write_result(out, side="trl", config=config_name, steps=records, extra={"final_rss_mb": peak_rss_mb()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args(argv)
    run_trl(args.config, args.workdir, args.out, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
