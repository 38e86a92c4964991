"""Loading the policy, its tokenizer and the frozen reference from a hub id or a local directory."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from trainer.config import GRPOConfig
from trainer.errors import ModelLoadError
from trainer.logprobs import Scoring, check_scoring

log = logging.getLogger(__name__)

# transformers (5.x, with the `kernels` package it requires) swaps layers for kernels downloaded
# from the Hub whenever a CUDA model changes train/eval mode: code fetched at run time (or a
# failure where the Hub is out of reach), and other kernels for training than for sampling and
# the load-time scoring check. Every model the trainer and the workers load keeps its own.
NO_HUB_KERNELS = {"use_kernels": False}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            # bf16 in hardware (Ampere on); torch also says yes where it only emulates it (V100, T4),
            # slowly, and vLLM refuses it below compute capability 8.0
            try:
                bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch before 2.4: no emulation counted
                bf16 = torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16 else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def training_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a job trains in: ``resolve_dtype``'s, except that ``auto`` never picks float16.
    Training in float16 needs a loss scale (small gradients underflow its range), which this
    trainer does not keep: a GPU without bfloat16 trains in float32 unless the spec asks."""
    dtype = resolve_dtype(name, device)
    return torch.float32 if name == "auto" and dtype == torch.float16 else dtype


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a bad source
        raise ModelLoadError(f"could not load the tokenizer of base_model {str(source)!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(
            f"the tokenizer of {str(source)!r} has no EOS token; completions could never stop"
        )
    return tokenizer


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion, in training and in chat: the tokenizer's EOS and the
    model's generation config's (one id or a list), those that are set."""
    eos = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(token for token in eos if token is not None)


def load_causal_lm(source: str | Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **NO_HUB_KERNELS)
    except Exception as exc:
        raise ModelLoadError(f"could not load base_model {str(source)!r} as a causal LM: {exc}") from exc
    return model.to(device)


@dataclass
class Models:
    policy: torch.nn.Module  # what the optimizer trains (a peft model when LoRA is on)
    reference: torch.nn.Module | None  # None when beta = 0, or when LoRA provides it (adapters off)
    tokenizer: PreTrainedTokenizerBase
    uses_lora: bool
    scoring: Scoring | None = (
        None  # how token_logprobs runs the model (None: the leanest its structure allows)
    )

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[torch.nn.Module]:
        """The frozen reference: the base with adapters disabled under LoRA, else the frozen copy."""
        if self.uses_lora:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            if self.reference is None:
                raise RuntimeError("no reference model is loaded (beta = 0)")
            yield self.reference


def load_models(
    base_model: str | Path,
    config: GRPOConfig,
    device: torch.device | None = None,
    *,
    on_log: Callable[[str, str], None] | None = None,
) -> Models:
    """The policy (with LoRA adapters when asked), its frozen reference and tokenizer, and the
    scoring checked against the model's own forward (``on_log`` hears when it falls back)."""
    device = device or default_device()
    tokenizer = load_tokenizer(base_model)
    dtype = training_dtype(config.dtype, device)
    policy = load_causal_lm(base_model, dtype, device)
    if dtype == torch.float16 and on_log is not None:
        on_log(
            "warning",
            "dtype float16: this trainer keeps no loss scale, so gradients smaller than float16 can "
            "hold (~6e-8) become 0 and those weights do not learn; bfloat16 or float32 train safely",
        )
    # Training's forwards keep no KV cache; a checkpoint's config.json says what the base's did
    # (trainer.checkpoint.save_checkpoint writes it back), so that its users' forwards cache.
    policy.base_use_cache = policy.config.use_cache
    policy.config.use_cache = False
    uses_lora = config.lora is not None
    reference = None
    if uses_lora:
        from peft import LoraConfig, get_peft_model

        lora = config.lora
        policy = get_peft_model(
            policy,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    elif config.beta > 0:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if uses_lora:
            policy.enable_input_require_grads()
    return Models(
        policy=policy,
        reference=reference,
        tokenizer=tokenizer,
        uses_lora=uses_lora,
        scoring=checked_scoring(policy, on_log or (lambda level, message: None)),
    )


def checked_scoring(policy: torch.nn.Module, on_log: Callable[[str, str], None]) -> Scoring:
    """The leanest scoring that reproduces the model's own forward on a sample; a fallback is
    announced, and a model whose own forward fails cannot train."""
    architecture = type(getattr(policy, "get_base_model", lambda: policy)()).__name__
    try:
        check = check_scoring(policy)
    except RuntimeError as exc:
        raise ModelLoadError(f"{architecture} cannot be trained: {exc}") from exc
    if check.mismatches:
        on_log(
            "warning",
            f"{architecture}: the lean log-prob path does not reproduce the model's own forward "
            f"({'; '.join(check.mismatches)}); this run scores with {check.scoring.describe()} "
            "(slower, but right)",
        )
    elif check.scoring != Scoring():
        on_log("info", f"{architecture}: log-probs scored with {check.scoring.describe()}")
    log.info("%s scores with %s", architecture, check.scoring.describe())
    return check.scoring
