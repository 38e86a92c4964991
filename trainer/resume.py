"""What a resume may change: the run a checkpoint recorded (``state.json``'s ``config``, its
``dataset_rows``) against the run asked to continue it.

Some fields make another run: the model, the adapters, the data the prompts are drawn from, the
batch's shape, the seed that orders the prompts and seeds every group, the dtype. A resume that
changes one of them is refused, naming the field. Optimisation settings may change (a lower
learning rate for the rest of a run, a longer run); they take effect from the resumed step on, and
a warning names them. Bookkeeping (``max_steps`` under a constant rate, checkpoints, evaluation,
logging, how the work is computed) changes silently.

A checkpoint written before a field was recorded (an older release: no ``config``, or fewer fields
in it) is compared on what it holds."""

from __future__ import annotations

import json
from typing import Any, NoReturn

import torch

from trainer.config import ConfigError, GRPOConfig, RunConfig

# Hyperparameters a resumed run keeps: it would be another run with another value.
FIXED = ("group_size", "prompts_per_step", "seed", "dtype")
# Hyperparameters that change nothing a run computes, or only when it stops, checkpoints or
# evaluates, or how it is computed: a resume may change them without a word.
FREE = (
    "max_steps",  # but under a decaying schedule it moves the rate: see schedule_changes
    "checkpoint_every",
    "keep_last_checkpoints",
    "eval_every",
    "eval_max_rows",
    "eval_pass_k",
    "eval_pass_threshold",
    "keep_best_by",
    "num_samples_logged",
    "max_reward_error_steps",
    "logprob_chunk_size",
    "gradient_checkpointing",
    "fsdp_reshard",
    "generation",
    "vllm_kv_cache_gib",
    "vllm_sleep",
)
# The adapters' shape: the checkpoint's adapter weights fit no other.
LORA_FIXED = ("r", "target_modules")

START_OVER = "start a new run to change it (--overwrite, or another --output)"


def check_resumable(saved: dict[str, Any], run: RunConfig, dataset_rows: int, checkpoint: str) -> list[str]:
    """The changes from the run that wrote ``checkpoint`` to ``run`` (whose dataset has
    ``dataset_rows`` rows) that a resume allows with a warning, each as ``"name old -> new"``.
    ``saved`` is the checkpoint's ``state.json``: its ``config`` the writing run's
    ``RunConfig.to_spec()``, its ``dataset_rows`` that run's row count, its ``sampler`` the prompt
    order's position. Raises ``ConfigError`` naming the first field a resume may not change."""
    recorded = saved.get("config")
    recorded = recorded if isinstance(recorded, dict) else {}
    old_base, new_base = recorded.get("base_model"), run.base_model
    if old_base is not None and old_base != new_base:
        _refuse("base_model", old_base, new_base, checkpoint)
    recorded_rows = saved.get("dataset_rows")
    if recorded_rows is not None and recorded_rows != dataset_rows:
        raise ConfigError(
            "dataset",
            f"has {dataset_rows} rows, but checkpoint {checkpoint} was trained on a dataset of "
            f"{recorded_rows} rows: a resumed run draws its prompts from the same data; {START_OVER}",
        )
    # An older checkpoint without the count: its prompt order shows a dataset at least this long.
    drawn = (saved.get("sampler") or {}).get("position")
    if recorded_rows is None and isinstance(drawn, int) and drawn > dataset_rows:
        raise ConfigError(
            "dataset",
            f"has {dataset_rows} rows, but checkpoint {checkpoint} had drawn {drawn} prompts of its "
            f"dataset's current epoch: a resumed run draws its prompts from the same data; {START_OVER}",
        )
    old = recorded.get("hyperparameters")
    old = old if isinstance(old, dict) else {}
    new = run.hyperparameters.to_dict()
    for name in FIXED:
        if name in old and old[name] != new[name]:
            _refuse(f"hyperparameters.{name}", old[name], new[name], checkpoint)
    warnings = []
    if "lora" in old:
        warnings += _lora_changes(old["lora"], new["lora"], checkpoint)
    for name in new:
        if name in FIXED or name in FREE or name == "lora" or name not in old or old[name] == new[name]:
            continue
        warnings.append(f"{name} {_show(old[name])} -> {_show(new[name])}")
    warnings += schedule_changes(old, run.hyperparameters)
    if "reward" in recorded and _canonical(recorded["reward"]) != _canonical(run.reward):
        warnings.append("reward (its functions or options)")
    return warnings


def schedule_changes(old: dict[str, Any], config: GRPOConfig) -> list[str]:
    """``max_steps`` moves a decaying learning-rate schedule's end (``trainer.schedule``): the rate
    of every step from the resumed one on changes with it."""
    before = old.get("max_steps")
    if before is None or before == config.max_steps or config.lr_schedule == "constant":
        return []
    return [f"max_steps {before} -> {config.max_steps} (the {config.lr_schedule} schedule now ends there)"]


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, config: GRPOConfig
) -> None:
    """Put ``config``'s optimisation settings into an optimizer and scheduler loaded from a
    checkpoint, whose states carry the values of the run that wrote it (the learning rate the
    schedule scales, AdamW's betas and weight decay): a resume that changes them trains with the
    new ones from its first step. Unchanged, every value is the one loaded, to the bit (the rate is
    computed as ``LambdaLR`` computes it)."""
    scheduler.base_lrs = [config.learning_rate for _ in optimizer.param_groups]
    rates = [
        base * factor(scheduler.last_epoch)
        for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["initial_lr"] = config.learning_rate
        group["lr"] = rate
        group["betas"] = (config.adam_beta1, config.adam_beta2)
        group["weight_decay"] = config.weight_decay
    scheduler._last_lr = rates  # what get_last_lr() answers until the next scheduler.step()


def _lora_changes(old: Any, new: dict[str, Any] | None, checkpoint: str) -> list[str]:
    if (old is None) != (new is None):
        asked, trained = (
            ("LoRA adapters", "full fine-tuning") if old is None else ("full fine-tuning", "LoRA adapters")
        )
        raise ConfigError(
            "hyperparameters.lora",
            f"asks for {asked}, but checkpoint {checkpoint} was trained with {trained}: a resumed run "
            f"keeps them; {START_OVER}",
        )
    if old is None or new is None or not isinstance(old, dict):
        return []
    for name in LORA_FIXED:
        if name in old and _canonical_lora(name, old[name]) != _canonical_lora(name, new[name]):
            _refuse(f"hyperparameters.lora.{name}", old[name], new[name], checkpoint)
    return [
        f"lora.{name} {_show(old[name])} -> {_show(new[name])}"
        for name in new
        if name not in LORA_FIXED and name in old and old[name] != new[name]
    ]


def _canonical_lora(name: str, value: Any) -> Any:
    """Target modules are a set: their order in the list names the same adapters."""
    if name == "target_modules" and isinstance(value, list):
        return sorted(value)
    return value


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _show(value: Any) -> str:
    return (
        json.dumps(value, default=str)
        if isinstance(value, dict | list | str) or value is None
        else str(value)
    )


def _refuse(param: str, old: Any, new: Any, checkpoint: str) -> NoReturn:
    raise ConfigError(
        param,
        f"is {_show(new)}, but checkpoint {checkpoint} was trained with {_show(old)}: a resumed run "
        f"keeps it; {START_OVER}",
    )
