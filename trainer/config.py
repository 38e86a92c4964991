"""Run configuration: the hyperparameters of one GRPO run and the job spec that carries them.

Standard library only, so that the service can validate a job spec with the very same rules
without importing torch.  Every validation error is a ``ConfigError`` whose ``param`` names the
field and whose message says how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
LR_SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The lowest temperature vLLM samples at (its _MAX_TEMP, 0.32: any in (0, 0.01) is sampled at
# 0.01): a rollout asked for less would be scored at a temperature it was not sampled at, so
# generation "vllm" refuses it; a chat completion above 0 and below it samples at it (trainer.chat).
MIN_SAMPLING_TEMPERATURE = 0.01
GENERATIONS = ("hf", "vllm")
FSDP_RESHARDS = ("auto", "layer", "step")
SAMPLER_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


class ConfigError(ValueError):
    """A value in a run config or job spec that cannot be used; ``param`` is its dotted path."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def _choice(param: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            param,
            f"unknown {param.rsplit('.', 1)[-1]} {value!r}; {did_you_mean(value, allowed)}"
            f"expected one of {', '.join(allowed)}",
        )


# What other trainers (TRL, Hugging Face's Trainer, OpenAI) call some of our hyperparameters.
ALIASES = {
    "num_generations": "group_size",
    "lr": "learning_rate",
    "max_new_tokens": "max_completion_length",
    "kl_coef": "beta",
    "kl_beta": "beta",
    "num_train_steps": "max_steps",
    "steps": "max_steps",
    "batch_size": "prompts_per_step",
    "save_steps": "checkpoint_every",
    "eval_steps": "eval_every",
    "lora_r": "lora",
    "use_lora": "lora",
    "cliprange": "epsilon",
    "clip_range": "epsilon",
}


def did_you_mean(name: Any, known: Any, aliases: dict[str, str] | None = None) -> str:
    """``"did you mean 'learning_rate'? "`` for a misspelt (or another trainer's) name of one of
    ``known``, else ``""``."""
    if not isinstance(name, str):
        return ""
    known = [str(k) for k in known]
    guess = (aliases or {}).get(name) or (difflib.get_close_matches(name, known, n=1, cutoff=0.6) or [None])[
        0
    ]
    if guess is None:  # case and separators: "Learning-Rate"
        folded = {k.lower().replace("-", "_"): k for k in known}
        guess = folded.get(name.lower().replace("-", "_").replace(" ", "_"))
    return f"did you mean {guess!r}? " if guess in known else ""


# Every integer fits a 32-bit signed int (what torch, numpy and a database column all take), and a
# seed an unsigned one (numpy's and torch's seeding); JSON has no such limits.
MAX_INTEGER = 2**31 - 1
MAX_SEED = 2**32 - 1
MAX_PASS_K = 256  # sampled completions per eval row for pass@k


def _at_least(
    param: str, value: Any, low: float, *, integer: bool = False, high: float | None = None
) -> None:
    """ConfigError unless ``value`` is an integer (or a finite number) in ``[low, high]``; an
    integer's ``high`` defaults to MAX_INTEGER. Every numeric field goes through here: NaN fails
    every comparison, so it must be refused before any of them."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(param, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not integer and not is_finite_number(value):
        raise ConfigError(param, f"must be a finite number, got {value!r}")
    if value < low:
        raise ConfigError(param, f"must be >= {low}, got {value!r}")
    if high is None and integer:
        high = MAX_INTEGER
    if high is not None and value > high:
        raise ConfigError(param, f"must be <= {high}, got {value!r}")


def is_finite_number(value: int | float) -> bool:
    """Neither NaN nor infinite, and (an integer) within a float's range."""
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _boolean(param: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(param, f"must be true or false, got {value!r}")


@dataclass
class LoraConfig:
    """Low-rank adapters instead of full fine-tuning (peft)."""

    r: int = 16
    alpha: float = 32  # peft's lora_alpha: the adapter's output is scaled by alpha / r
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"

    def validate(self, prefix: str = "lora") -> None:
        _at_least(f"{prefix}.r", self.r, 1, integer=True)
        _at_least(f"{prefix}.alpha", self.alpha, 1e-9)
        _at_least(f"{prefix}.dropout", self.dropout, 0.0)
        if not self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout", f"must be in [0, 1), got {self.dropout!r}")
        modules = self.target_modules
        if not (
            isinstance(modules, str) or isinstance(modules, list) and all(isinstance(m, str) for m in modules)
        ):
            raise ConfigError(
                f"{prefix}.target_modules", f"must be a list of module names or 'all-linear', got {modules!r}"
            )
        if not modules:
            raise ConfigError(f"{prefix}.target_modules", "name at least one module, or 'all-linear'")


@dataclass
class GRPOConfig:
    """Hyperparameters of a GRPO run. Names follow TRL's GRPOConfig where one exists."""

    group_size: int = 8  # G: completions sampled per prompt
    prompts_per_step: int = 8  # prompts per optimizer step; the batch is prompts_per_step * G
    max_steps: int = 200
    learning_rate: float = 1e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float | None = 1.0
    max_prompt_length: int = 512  # longer prompts keep their last tokens (left truncation)
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04  # KL coefficient; 0 loads no reference model
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip: ratio <= 1 + epsilon_high (defaults to epsilon)
    delta: float | None = None  # two-sided clipping: the unclipped ratio is capped at delta
    num_iterations: int = 1  # mu: optimizer passes over each generated batch
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    importance_sampling_level: str = "token"
    mask_truncated_completions: bool = False
    generation: str = "hf"  # the sampler: "hf" (the policy module itself) or "vllm" (a vLLM engine)
    # Sampler/trainer mismatch correction: each token's policy loss is weighted by
    # pi_trainer / pi_sampler (token_*: per token; sequence_*: exp of the completion's summed
    # log-ratio), truncated at the cap (*_truncate) or zeroed above it (*_mask); null: off. The
    # defaults are TRL's (vllm_importance_sampling_correction=True, _mode="sequence_mask", _cap=3.0).
    sampler_correction: str | None = "sequence_mask"
    sampler_correction_cap: float = 3.0
    # generation "vllm": the engine's KV cache (its memory for sequences in flight), GiB
    vllm_kv_cache_gib: float = 1.0
    # generation "vllm": the engine the trainer starts sleeps while the policy trains (its weights
    # and KV cache leave the device) where vLLM's platform has sleep mode (GPUs; not its CPU build).
    # Off by default, as in TRL: the sleeping path has not run on a GPU here yet
    vllm_sleep: bool = False
    # gpus > 1: how a step's training holds the sharded model (trainer.distributed): "layer" gathers
    # each decoder layer for its forward and its backward (least memory; one padded forward per
    # micro-batch), "step" the whole model once for the step (least communication, the leanest
    # scoring), "auto" whichever the step's batch makes hold less memory
    fsdp_reshard: str = "auto"
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3  # bound on the extra draws dynamic sampling may make per step
    seed: int = 0
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    checkpoint_every: int = 50  # 0: only the final checkpoint
    keep_last_checkpoints: int = 2  # 0 keeps them all
    eval_every: int = (
        0  # steps between evaluations on the eval set (besides one at every checkpoint); 0: checkpoints only
    )
    eval_max_rows: int = 256  # the eval set's first rows that an evaluation uses
    eval_pass_k: int = 0  # pass@k from k sampled completions per eval row; 0: greedy reward only
    eval_pass_threshold: float = 1.0  # a completion passes when its total (weighted) reward is at least this
    keep_best_by: str | None = (
        None  # e.g. "eval/reward": the best checkpoint by it outlives keep_last_checkpoints
    )
    logprob_chunk_size: int = 1024  # tokens per chunk of the vocabulary projection
    num_samples_logged: int = 4  # completions a step hands to Progress.on_samples
    max_reward_error_steps: int = (
        3  # fail once a reward errs on every completion this many steps in a row; 0: never
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)
        self.validate()

    @property
    def best_metric_choices(self) -> tuple[str, ...]:
        """The eval figures ``keep_best_by`` may name (higher is better for each)."""
        if not self.eval_pass_k:
            return ("eval/reward",)
        return tuple(dict.fromkeys(("eval/reward", "eval/pass@1", f"eval/pass@{self.eval_pass_k}")))

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def validate(self) -> None:
        _at_least("group_size", self.group_size, 2, integer=True)
        for name in (
            "prompts_per_step",
            "max_steps",
            "max_prompt_length",
            "max_completion_length",
            "num_iterations",
            "logprob_chunk_size",
            "eval_max_rows",
        ):
            _at_least(f"{name}", getattr(self, name), 1, integer=True)
        for name in (
            "warmup_steps",
            "checkpoint_every",
            "keep_last_checkpoints",
            "eval_every",
            "num_samples_logged",
            "max_resample_rounds",
            "max_reward_error_steps",
        ):
            _at_least(f"{name}", getattr(self, name), 0, integer=True)
        _at_least("seed", self.seed, 0, integer=True, high=MAX_SEED)
        _at_least("eval_pass_k", self.eval_pass_k, 0, integer=True, high=MAX_PASS_K)
        _at_least("eval_pass_threshold", self.eval_pass_threshold, -math.inf)
        if self.keep_best_by is not None and self.keep_best_by not in self.best_metric_choices:
            pass_k = (
                " (pass@k figures need eval_pass_k > 0)"
                if str(self.keep_best_by).startswith("eval/pass@")
                else ""
            )
            raise ConfigError(
                "keep_best_by",
                f"unknown keep_best_by {self.keep_best_by!r}; "
                f"{did_you_mean(self.keep_best_by, self.best_metric_choices)}expected one of "
                f"{', '.join(self.best_metric_choices)}, or null{pass_k}",
            )
        for name in (
            "mask_truncated_completions",
            "dynamic_sampling",
            "gradient_checkpointing",
            "vllm_sleep",
        ):
            _boolean(name, getattr(self, name))
        _at_least("learning_rate", self.learning_rate, 0.0)
        _at_least("weight_decay", self.weight_decay, 0.0)
        _at_least("beta", self.beta, 0.0)
        _at_least("epsilon", self.epsilon, 0.0)
        if self.epsilon_high is not None:
            _at_least("epsilon_high", self.epsilon_high, 0.0)
        if self.delta is not None:
            _at_least("delta", self.delta, 1.0)
        if self.max_grad_norm is not None:
            _at_least("max_grad_norm", self.max_grad_norm, 1e-12)
        _at_least("temperature", self.temperature, 1e-6)
        if self.generation == "vllm" and self.temperature < MIN_SAMPLING_TEMPERATURE:
            raise ConfigError(
                "temperature",
                f"must be >= {MIN_SAMPLING_TEMPERATURE} with generation vllm, got {self.temperature!r}: "
                f"vLLM samples any lower temperature at {MIN_SAMPLING_TEMPERATURE}, and the log-probs "
                "would be computed at another temperature than the one that sampled",
            )
        _at_least("top_p", self.top_p, 0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        for name, value in (("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)):
            _at_least(name, value, 0.0)
            if not value < 1.0:
                raise ConfigError(f"{name}", f"must be in [0, 1), got {value!r}")
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("generation", self.generation, GENERATIONS)
        _choice("fsdp_reshard", self.fsdp_reshard, FSDP_RESHARDS)
        if self.sampler_correction is not None and self.sampler_correction not in SAMPLER_CORRECTIONS:
            raise ConfigError(
                "sampler_correction",
                f"unknown sampler_correction {self.sampler_correction!r}; "
                f"{did_you_mean(self.sampler_correction, SAMPLER_CORRECTIONS)}expected one of "
                f"{', '.join(SAMPLER_CORRECTIONS)}, or null (no correction)",
            )
        _at_least("sampler_correction_cap", self.sampler_correction_cap, 1.0)
        _at_least("vllm_kv_cache_gib", self.vllm_kv_cache_gib, 0.001)
        if self.lora is not None:
            if not isinstance(self.lora, LoraConfig):
                raise ConfigError(
                    "lora", f'must be an object such as {{"r": 16, "alpha": 32}}, or null; got {self.lora!r}'
                )
            self.lora.validate("lora")

    @classmethod
    def from_dict(cls, values: dict[str, Any], prefix: str = "hyperparameters.") -> GRPOConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{prefix}{unknown[0]}",
                f"unknown hyperparameter {unknown[0]!r}; "
                f"{did_you_mean(unknown[0], known, ALIASES)}known ones: {', '.join(sorted(known))}",
            )
        lora = values.get("lora")
        if isinstance(lora, dict):
            lora_known = {f.name for f in dataclasses.fields(LoraConfig)}
            extra = sorted(set(lora) - lora_known)
            if extra:
                hint = did_you_mean(
                    extra[0], lora_known, {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout"}
                )
                raise ConfigError(
                    f"{prefix}lora.{extra[0]}",
                    f"unknown LoRA option; {hint}known ones: {', '.join(sorted(lora_known))}",
                )
            values = {**values, "lora": LoraConfig(**lora)}
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc.param}", exc.message) from None
        except TypeError as exc:  # e.g. a string where a number belongs
            raise ConfigError(prefix.rstrip("."), str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OperatorPolicy:
    """What the operator of the machine lets a run do. Never part of a job spec (a tenant writes
    the spec): the service fills it from its settings (``GRPO_ALLOW_PRIVATE_HOSTS``,
    ``GRPO_SANDBOX_ALLOW_UNISOLATED``, ``GRPO_SANDBOX_ALLOW_NETWORK``), ``python -m trainer`` from
    the environment variables of the same names. The defaults allow nothing."""

    # non-public hosts (by name, or by address for an IP) that outbound calls may reach anyway
    allow_private_hosts: tuple[str, ...] = ()
    # where the machine refuses the sandbox's namespaces, run code_tests with its limits only
    sandbox_allow_unisolated: bool = False
    # a code_tests spec may ask for allow_network
    sandbox_allow_network: bool = False


@dataclass
class RunConfig:
    """One run: which model, which data, which rewards, which hyperparameters.

    The same shape as the HTTP job spec, with ``dataset`` a local JSONL path instead of an id;
    ``policy`` is the operator's, not the spec's.
    """

    base_model: str
    dataset: str
    reward: list[dict[str, Any]]
    hyperparameters: GRPOConfig = field(default_factory=GRPOConfig)
    eval_dataset: str | None = None
    name: str | None = None
    policy: OperatorPolicy = field(default_factory=OperatorPolicy)
    # Processes the job trains on, one per GPU (``python -m trainer run`` starts them under
    # torchrun; on a machine without GPUs each process computes on the CPU). The result is the
    # same for every count: it sets how the work is split, not what is computed.
    gpus: int = 1

    def __post_init__(self) -> None:
        _at_least("gpus", self.gpus, 1, integer=True)

    @classmethod
    def from_spec(
        cls, spec: dict[str, Any], policy: OperatorPolicy | None = None, *, strict: bool = False
    ) -> RunConfig:
        """Build from a spec file's dict. ``group_size`` may sit at the top level
        (``spec_hyperparameters``). ``strict`` (``python -m trainer run``): a key other than
        SPEC_FILE_KEYS is refused, naming it (a misspelt ``hyperparameters`` would otherwise run on
        the defaults); else other keys are not read. A stored job is read by ``jobs.submission``."""
        if strict:
            check_spec_file_keys(spec)
        for required in ("base_model", "dataset", "reward"):
            if not spec.get(required):
                raise ConfigError(required, "is required")
        for key in ("base_model", "dataset", "eval_dataset"):
            value = spec.get(key)
            if value is not None and not isinstance(value, str):
                raise ConfigError(key, f"must be a string, got {value!r}")
        reward = spec["reward"]
        if isinstance(reward, dict):
            reward = [reward]
        if not isinstance(reward, list) or not reward:
            raise ConfigError("reward", 'give a list of reward functions, e.g. [{"type": "exact_match"}]')
        config = spec_hyperparameters(spec)
        check_eval_settings(config, has_eval_dataset=bool(spec.get("eval_dataset")))
        return cls(
            base_model=str(spec["base_model"]),
            dataset=str(spec["dataset"]),
            reward=reward,
            hyperparameters=config,
            eval_dataset=spec.get("eval_dataset"),
            name=spec.get("name"),
            policy=policy or OperatorPolicy(),
            gpus=1 if spec.get("gpus") is None else spec["gpus"],
        )

    def check_eval_settings(self) -> None:
        """ConfigError where the hyperparameters need an eval set the run does not have."""
        check_eval_settings(self.hyperparameters, has_eval_dataset=bool(self.eval_dataset))

    def to_spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base_model": self.base_model,
            "dataset": self.dataset,
            "eval_dataset": self.eval_dataset,
            "reward": self.reward,
            "gpus": self.gpus,
            "hyperparameters": self.hyperparameters.to_dict(),
        }


# The keys of a spec file (``python -m trainer run``): those RunConfig.from_spec reads, and
# RunConfig.to_spec writes.
SPEC_FILE_KEYS = (
    "base_model",
    "dataset",
    "eval_dataset",
    "reward",
    "group_size",
    "hyperparameters",
    "gpus",
    "name",
)
# What the HTTP API's job request (or another habit) calls some of them.
SPEC_FILE_ALIASES = {
    "dataset_id": "dataset",
    "eval_dataset_id": "eval_dataset",
    "model": "base_model",
    "rewards": "reward",
    "reward_functions": "reward",
    "config": "hyperparameters",
}


def check_spec_file_keys(spec: dict[str, Any]) -> None:
    """ConfigError naming the first key of ``spec`` a spec file does not have (SPEC_FILE_KEYS),
    with a did-you-mean: the HTTP API refuses such a key too (its extra fields are forbidden)."""
    unknown = sorted((key for key in spec if key not in SPEC_FILE_KEYS), key=str)
    if unknown:
        key = unknown[0]
        raise ConfigError(
            str(key),
            f"unknown key {key!r}; {did_you_mean(key, SPEC_FILE_KEYS, SPEC_FILE_ALIASES)}a spec file's keys: "
            f"{', '.join(SPEC_FILE_KEYS)}",
        )


def spec_hyperparameters(spec: dict[str, Any]) -> GRPOConfig:
    """A spec's hyperparameters: its ``hyperparameters``, with its top-level ``group_size`` (unless
    null) in place of theirs. The one place the two spellings of ``group_size`` meet: a spec file
    and a job request are read through here (a stored job says it once, inside its
    hyperparameters: ``jobs.submission.stored_spec``). Each spelling is checked where it was
    written, with the same rule (an integer >= 2, never a bool or a string), and an error names
    it; given both, they must agree."""
    hyperparameters = spec.get("hyperparameters") or {}
    if not isinstance(hyperparameters, dict):
        raise ConfigError(
            "hyperparameters", f'must be an object such as {{"max_steps": 100}}, got {hyperparameters!r}'
        )
    hyperparameters = dict(hyperparameters)
    top_level = spec.get("group_size")
    if top_level is not None:
        _at_least("group_size", top_level, 2, integer=True)
        if "group_size" in hyperparameters:
            inside = hyperparameters["group_size"]
            _at_least("hyperparameters.group_size", inside, 2, integer=True)
            if inside != top_level:
                raise ConfigError(
                    "hyperparameters.group_size",
                    f"is {inside}, but group_size (at the top level) is {top_level}: give group_size "
                    "once, in either place, or the same value in both",
                )
        hyperparameters["group_size"] = top_level
    return GRPOConfig.from_dict(hyperparameters)


def check_prompts_for_processes(config: GRPOConfig, processes: int, asked_as: str) -> None:
    """ConfigError unless each of a job's ``processes`` (``asked_as``, as the user asked for them:
    "gpus (2)") has a prompt of every step to generate from: a process with none would only wait."""
    if config.prompts_per_step < processes:
        raise ConfigError(
            "hyperparameters.prompts_per_step",
            f"prompts_per_step is {config.prompts_per_step}, fewer than {asked_as}: each of a job's "
            f"processes generates and trains whole groups, one prompt's each; ask for at least "
            f"{processes} prompts per step, or fewer processes",
        )


def check_eval_settings(config: GRPOConfig, *, has_eval_dataset: bool) -> None:
    """``keep_best_by`` chooses among evaluated checkpoints: without an eval set there are none."""
    if config.keep_best_by is not None and not has_eval_dataset:
        raise ConfigError(
            "hyperparameters.keep_best_by",
            f"keep_best_by {config.keep_best_by!r} ranks checkpoints by "
            "their evaluation, which needs an eval dataset: give eval_dataset_id (eval_dataset in a "
            "spec file), or set keep_best_by to null",
        )
