"""What a job will need before it runs (``POST /v1/jobs?dry_run=true``): tokens per step, the
memory its model and batch take, the time per step and in all, and the lengths its model cannot
take. Read off the model directory's ``config.json`` (and its safetensors headers, its
``tokenizer.json``) and the dataset's first rows: nothing is loaded, no torch is imported.

A job of ``gpus`` N > 1 runs on N processes (``trainer.distributed``): the memory figures are then
one device's, and the time the job's (``memory``, ``step_rate``).

Every figure is an estimate and says how it was made (``JobEstimate.notes``).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.model_paths import names_hub
from jobs.models import Job, JobMetrics, JobStatus
from jobs.schemas import EstimateMemory, EstimateTime, EstimateTokens, JobEstimate
from jobs.settings import Settings
from trainer.config import ConfigError, GRPOConfig
from trainer.data import messages_text, parse_line
from trainer.errors import DatasetError

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4.0  # English text under a BPE tokenizer, roughly; used when no tokenizer.json is at hand
PROMPT_SAMPLE_ROWS = 200
FORWARD_TOKEN_BUDGET = (
    8192  # trainer.loop.FORWARD_TOKEN_BUDGET (that module imports torch; a test keeps them equal)
)
DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
LORA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECENT_JOBS, RECENT_STEPS = 3, 20  # finished jobs (and their last steps) whose throughput is used
MAX_HEADER_BYTES = 100 * 1024 * 1024  # a safetensors header larger than this is not read


@dataclass
class ModelShape:
    """What the estimate needs of a model, from its config.json (and weight files)."""

    parameters: int
    parameters_from: str
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int | None
    root_parameters: int  # outside the decoder layers: the embeddings, the final norm, an untied LM head


def _first(config: dict[str, Any], *names: str) -> Any:
    return next(
        (config[name] for name in names if isinstance(config.get(name), int) and config[name] > 0), None
    )


def read_model_shape(directory: Path) -> ModelShape | None:
    """The shape of the model in ``directory``, or None without a config.json this can read."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("text_config"), dict):  # a multimodal model: its language model is what trains
        config = {**config, **config["text_config"]}
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _first(config, "vocab_size")
    if not (hidden and layers and vocab):
        return None
    heads = _first(config, "num_attention_heads", "n_head") or 1
    kv_heads = _first(config, "num_key_value_heads") or heads
    head_dim = _first(config, "head_dim") or hidden // heads
    intermediate = _first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    experts = _first(config, "num_local_experts", "num_experts", "n_routed_experts") or 0
    expert_size = _first(config, "moe_intermediate_size") or intermediate
    attention = hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    # a gated MLP (gate, up, down), as Llama, Qwen, Mistral and Gemma have; a mixture of experts has
    # one per expert and a router
    mlp = experts * 3 * hidden * expert_size + hidden * experts if experts else 3 * hidden * intermediate
    root = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2) + hidden
    counted = root + layers * (attention + mlp + 2 * hidden)
    weighed = safetensors_parameters(directory)
    return ModelShape(
        parameters=weighed or counted,
        parameters_from="safetensors" if weighed else "config.json",
        hidden=hidden,
        layers=layers,
        vocab=vocab,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        max_positions=_first(config, "max_position_embeddings", "n_positions", "max_seq_len"),
        root_parameters=root,
    )


def safetensors_parameters(directory: Path) -> int | None:
    """The parameters in the directory's safetensors files, read from their headers (the first
    bytes of each file: a length, then JSON with every tensor's shape); None if there are none."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        try:
            with path.open("rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                if length > MAX_HEADER_BYTES:
                    return None
                header = json.loads(file.read(length))
        except (OSError, ValueError, struct.error):
            return None
        for name, tensor in header.items():
            if name != "__metadata__" and isinstance(tensor, dict) and isinstance(tensor.get("shape"), list):
                total += math.prod(tensor["shape"])
    return total or None


@dataclass
class PromptLengths:
    mean: float
    longest: int
    measured_with: str  # "tokenizer" | "characters"
    rows: int
    truncated: float  # share longer than max_prompt_length
    shortest: int = 0
    every_row: bool = False  # the dataset's every row was measured, not only its first ones


def prompt_text(prompt: Any) -> str:
    """A row's prompt as text; chat messages as the trainer writes them without a chat template
    (the estimate loads no template), a line each."""
    return prompt if isinstance(prompt, str) else messages_text(prompt)


def measure_prompts(dataset: Path, model_dir: Path | None, max_prompt_length: int) -> PromptLengths | None:
    """Prompt lengths over the dataset's first PROMPT_SAMPLE_ROWS rows (``every_row``: that is all
    of them): tokens with the model's tokenizer.json when it has one (the ``tokenizers`` library,
    no transformers), else characters / CHARS_PER_TOKEN."""
    texts, every_row = [], True
    try:
        with dataset.open("rb") as lines:
            for line in lines:
                try:
                    row = parse_line(line.decode("utf-8"), None)
                except (DatasetError, UnicodeDecodeError):
                    every_row = False  # checked on upload, so never; but then not every row was measured
                    continue
                if row is None:
                    continue
                if len(texts) >= PROMPT_SAMPLE_ROWS:  # a row beyond the sample
                    every_row = False
                    break
                texts.append(prompt_text(row["prompt"]))
    except OSError:
        return None
    if not texts:
        return None
    lengths, measured_with = None, "characters"
    tokenizer_file = model_dir / "tokenizer.json" if model_dir is not None else None
    if tokenizer_file is not None and tokenizer_file.is_file():
        try:
            from tokenizers import Tokenizer  # Rust, no torch: fine in the API

            tokenizer = Tokenizer.from_file(str(tokenizer_file))
            lengths = [
                len(encoding.ids) for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)
            ]
            measured_with = "tokenizer"
        except Exception as exc:  # any tokenizer file it cannot read: fall back on characters
            log.info("estimate: could not use %s (%s); counting characters", tokenizer_file, exc)
    if lengths is None:
        lengths = [max(1, math.ceil(len(text) / CHARS_PER_TOKEN)) for text in texts]
    return PromptLengths(
        mean=statistics.fmean(min(n, max_prompt_length) for n in lengths),
        longest=max(lengths),
        measured_with=measured_with,
        rows=len(texts),
        truncated=sum(n > max_prompt_length for n in lengths) / len(lengths),
        shortest=min(lengths),
        every_row=every_row,
    )


def prompt_length_warnings(lengths: PromptLengths, limit: int) -> list[str]:
    """What the measured prompts say about max_prompt_length (``limit``): prompts that will lose
    their first tokens, or a job that will fail at its start because every prompt would (the
    trainer refuses to train on nothing but cut prompts). Where that is certain (the tokenizer
    counted every row) creating the job is refused instead: ``check_a_prompt_fits``."""
    if not lengths.truncated:
        return []
    if lengths.truncated < 1:
        return [
            f"{lengths.truncated:.0%} of the sampled prompts are longer than max_prompt_length ({limit} "
            f"tokens; the longest is {lengths.longest}): they lose their first tokens (left truncation); "
            "raise max_prompt_length to keep them whole"
        ]
    fails = (
        "the job fails when it starts (the trainer refuses a dataset none of whose prompts fits: every "
        "one would lose its beginning)"
    )
    if lengths.measured_with == "tokenizer":
        which, unless = (
            ("every prompt of the dataset", "")
            if lengths.every_row
            else (
                f"every one of the dataset's first {lengths.rows} prompts",
                "unless a later row is shorter, ",
            )
        )
        return [
            f"{which} is longer than max_prompt_length ({limit} tokens; the shortest is {lengths.shortest}, "
            f"before the chat template's markup): {unless}{fails}; raise max_prompt_length to at least "
            f"{lengths.shortest}, or shorten the prompts"
        ]
    whole = " (the whole dataset)" if lengths.every_row else ""
    return [
        f"every one of the {lengths.rows} sampled prompts{whole} is longer than max_prompt_length ({limit} "
        f"tokens) by a guess of {CHARS_PER_TOKEN:g} characters a token (the shortest ~{lengths.shortest}; no "
        f"tokenizer.json it could read): if the model's tokenizer counts as many, {fails}; raise "
        f"max_prompt_length to at least ~{lengths.shortest}, or shorten the prompts"
    ]


def check_a_prompt_fits(config: GRPOConfig, base_model: str, dataset: Path) -> None:
    """ConfigError naming hyperparameters.max_prompt_length when it is certain that every prompt
    of the dataset is longer, so the job would fail at its start: the model's tokenizer.json
    counted every row (``measure_prompts``: a dataset of PROMPT_SAMPLE_ROWS rows at most), and
    even without the chat template's markup and BOS the trainer adds, none fits. On a sample, or
    on the characters-a-token guess, the estimate warns instead (``prompt_length_warnings``). The
    trainer's own check at the start, counting as the model reads prompts, is
    ``trainer.prompts.check_a_prompt_fits``."""
    model_dir = local_model_dir(base_model)
    if model_dir is None or not (model_dir / "tokenizer.json").is_file():
        return
    lengths = measure_prompts(dataset, model_dir, config.max_prompt_length)
    if lengths is None or lengths.measured_with != "tokenizer" or not lengths.every_row:
        return
    if lengths.shortest > config.max_prompt_length:
        raise ConfigError(
            "hyperparameters.max_prompt_length",
            f"every prompt of the dataset is longer than max_prompt_length ({config.max_prompt_length} "
            f"tokens): the shortest is {lengths.shortest} tokens by the model's tokenizer, before the chat "
            "template's markup and BOS, so the job would fail when it starts, every prompt losing its "
            f"beginning. Raise max_prompt_length to at least {lengths.shortest} (more with a chat "
            "template), or shorten the prompts",
        )


def local_model_dir(base_model: str) -> Path | None:
    """The directory of a local base_model (already checked to be allowed), None for a hub id
    (whatever else the API's current directory holds: ``jobs.model_paths.names_hub``; one that
    also names an allowed model directory was refused by ``check_model``)."""
    if names_hub(base_model):
        return None
    return Path(base_model).expanduser().resolve()


def context_warnings(config: GRPOConfig, shape: ModelShape | None) -> list[str]:
    """What the model's context cannot take: max_prompt_length + max_completion_length beyond
    its max_position_embeddings (positions past it are untrained, or an error)."""
    if shape is None or shape.max_positions is None:
        return []
    total = config.max_prompt_length + config.max_completion_length
    if total <= shape.max_positions:
        return []
    return [
        f"max_prompt_length + max_completion_length = {config.max_prompt_length} + "
        f"{config.max_completion_length} = {total}, beyond the model's context of {shape.max_positions} "
        f"tokens (max_position_embeddings in its config.json): a sequence that long gets positions the model "
        f"never learned, or fails; lower them so that they add up to {shape.max_positions} at most"
    ]


def memory(
    config: GRPOConfig, shape: ModelShape, prompt_tokens: float, settings: Settings, *, gpus: int = 1
) -> EstimateMemory:
    """What one device holds at most. On one device: the weights, the reference, the gradients and
    the optimizer's state, plus the larger of the activations and the generation cache.

    On ``gpus`` N > 1, as ``trainer.distributed`` runs a job: FSDP2 shards the weights, the
    reference, the gradients and the optimizer's state over the N processes, each holding 1/N of
    each throughout; each process generates and trains its own share of the prompts (ceil(P / N)
    of prompts_per_step P), which divides its cache and its activations. Beyond its shards, a
    process gathers, while it generates, the full weights (``gathered_bytes``: the policy's; the
    reference's forward, after it, gathers no more, the policy being freed meanwhile), and while
    it trains (``training_gathered_bytes``), as ``fsdp_reshard`` says: "layer", the root's weights
    (embeddings, final norm, LM head) and two decoder layers' (FSDP overlaps the next one's gather
    with the current one), with their gradients, every row [prompt, completion] padded in one
    forward (more activations); "step", the whole model's weights and gradients, with the lean
    activations; "auto", whichever of the two totals less, as the trainer picks. Not counted:
    FSDP's padding of each shard and its communication buffers."""
    dtype = (
        config.dtype
        if config.dtype != "auto"
        else ("float32" if settings.worker_device == "cpu" else "bfloat16")
    )
    size = DTYPE_BYTES[dtype]
    n = shape.parameters
    kv_dim = shape.kv_heads * shape.head_dim
    if config.lora is None:
        trainable = n
    else:
        targets = config.lora.target_modules
        names = LORA_LINEARS if targets == "all-linear" else [t for t in targets if t in LORA_LINEARS]
        q_dim = shape.heads * shape.head_dim
        shapes = {
            "q_proj": (shape.hidden, q_dim),
            "k_proj": (shape.hidden, kv_dim),
            "v_proj": (shape.hidden, kv_dim),
            "o_proj": (q_dim, shape.hidden),
            "gate_proj": (shape.hidden, shape.intermediate),
            "up_proj": (shape.hidden, shape.intermediate),
            "down_proj": (shape.intermediate, shape.hidden),
        }
        trainable = shape.layers * sum(config.lora.r * sum(shapes[name]) for name in names)
    trainable_size = size if config.lora is None else 4  # LoRA's adapters are float32 (peft upcasts them)
    # AdamW's two moments in float32, and a half-precision parameter's float32 master copy
    # (trainer.optimizer: updates below bfloat16's resolution would otherwise be lost)
    optimizer_per_parameter = 2 * 4 + (4 if trainable_size < 4 else 0)
    completion = config.max_completion_length
    prompts = math.ceil(config.prompts_per_step / gpus)  # this process's share of the step's prompts
    group_tokens = prompt_tokens + config.group_size * completion  # the prompt is scored once per group
    per_token_layer = 6 * shape.hidden + 2 * kv_dim + 4 * shape.intermediate  # saved tensors of one layer

    def activations(forward_tokens: float) -> float:
        if config.gradient_checkpointing:  # each layer's input is kept, and one layer's inside at a time
            saved = forward_tokens * (shape.layers * shape.hidden + per_token_layer) * size
        else:
            saved = forward_tokens * shape.layers * per_token_layer * size
        return (
            saved + 2 * min(config.logprob_chunk_size, forward_tokens) * shape.vocab * 4
        )  # + head chunk, grad

    lean = activations(max(min(FORWARD_TOKEN_BUDGET, prompts * group_tokens), group_tokens))
    row_tokens = prompt_tokens + completion  # one padded row per completion, by layer
    # (a group is never split: one over the budget is one forward of its own)
    padded = activations(
        max(
            min(FORWARD_TOKEN_BUDGET, prompts * config.group_size * row_tokens),
            config.group_size * row_tokens,
        )
    )
    sequences = prompts * config.group_size
    cache = sequences * (prompt_tokens + completion) * shape.layers * 2 * kv_dim * size
    weights = n * size
    reference = weights if config.beta > 0 and config.lora is None else 0
    gathered = training_gathered = 0
    activation_bytes = lean
    engine = 0
    if config.generation == "vllm":  # the engine beside the trainer: its own weights and its KV cache
        engine = weights + int(config.vllm_kv_cache_gib * (1 << 30))
    if gpus > 1:
        gathered = weights
        root = min(shape.root_parameters, n)
        root_trainable = root if config.lora is None else 0  # LoRA adapts the layers' linears alone
        layer = (n - root) / shape.layers
        layer_trainable = (trainable - root_trainable) / shape.layers
        at_once = min(2, shape.layers)
        by_layer = (root + root_trainable + at_once * (layer + layer_trainable)) * size, padded
        by_step = (n + trainable) * size, lean
        choice = {"layer": by_layer, "step": by_step}.get(config.fsdp_reshard) or min(
            by_layer, by_step, key=sum
        )
        training_gathered, activation_bytes = int(choice[0]), choice[1]
    shard = math.ceil  # each process's 1/N of a sharded tensor (FSDP pads to a multiple of N)
    parts = dict(
        weights_bytes=shard(weights / gpus),
        reference_model_bytes=shard(reference / gpus),
        gradients_bytes=shard(trainable * trainable_size / gpus),
        optimizer_bytes=shard(optimizer_per_parameter * trainable / gpus),
        activations_bytes=int(activation_bytes),
        generation_cache_bytes=int(cache),
        gathered_bytes=gathered,
        training_gathered_bytes=training_gathered,
        generation_engine_bytes=engine,
    )
    # while training, a vLLM engine keeps its memory unless it sleeps (vllm_sleep); while
    # generating, it samples with its own cache (the trainer keeps none)
    awake_while_training = 0 if config.vllm_sleep else engine
    total = (
        parts["weights_bytes"]
        + parts["reference_model_bytes"]
        + parts["gradients_bytes"]
        + parts["optimizer_bytes"]
        + max(
            training_gathered + parts["activations_bytes"] + awake_while_training,
            gathered + (engine if engine else parts["generation_cache_bytes"]),
        )
    )
    return EstimateMemory(
        parameters=n,
        parameters_from=shape.parameters_from,
        dtype=dtype,
        trainable_parameters=trainable,
        total_bytes=total,
        **parts,
    )


def measured_throughput(
    *, session: Session, owner: str, base_model: str, gpus: int = 1
) -> tuple[float, int] | None:
    """The median tokens_per_second of the last steps of ``owner``'s latest succeeded jobs of
    ``base_model`` on ``gpus`` devices (a job's figure is all its processes' together), and how
    many jobs that is; None without one."""
    jobs = session.scalars(
        select(Job.id)
        .where(
            Job.owner == owner,
            Job.base_model == base_model,
            Job.gpus == gpus,
            Job.status == JobStatus.succeeded,
        )
        .order_by(Job.finished_at.desc())
        .limit(RECENT_JOBS)
    ).all()
    rates: list[float] = []
    for job_id in jobs:
        rows = session.scalars(
            select(JobMetrics.metrics)
            .where(JobMetrics.job_id == job_id)
            .order_by(JobMetrics.step.desc())
            .limit(RECENT_STEPS)
        ).all()
        rates += [
            float(m["tokens_per_second"])
            for m in rows
            if isinstance(m.get("tokens_per_second"), int | float) and m["tokens_per_second"] > 0
        ]
    return (statistics.median(rates), len(jobs)) if rates else None


def estimate_job(
    *,
    session: Session,
    owner: str,
    config: GRPOConfig,
    base_model: str,
    dataset: Path,
    settings: Settings,
    gpus: int = 1,
) -> JobEstimate:
    """The estimate for a job already checked in full (``check_job_request``), on ``gpus`` devices."""
    notes, warnings = [], []
    model_dir = local_model_dir(base_model)
    shape = read_model_shape(model_dir) if model_dir is not None else None
    if model_dir is None:
        notes.append(
            "base_model is a hub id: the memory figures and the context check need its config.json, which "
            "this server does not download; estimate with a local copy (a directory under GRPO_MODEL_DIRS)"
        )
    elif shape is None:
        notes.append(
            "base_model's config.json lacks hidden_size, num_hidden_layers or vocab_size: no memory figures"
        )

    lengths = measure_prompts(dataset, model_dir, config.max_prompt_length)
    if lengths is None:  # the dataset was checked on upload; unreadable now only if its file went
        lengths = PromptLengths(
            mean=float(config.max_prompt_length),
            longest=config.max_prompt_length,
            measured_with="characters",
            rows=0,
            truncated=0.0,
        )
        notes.append("the dataset could not be read: prompts are counted at max_prompt_length")
    elif lengths.measured_with == "tokenizer":
        notes.append(
            f"prompt lengths: the first {lengths.rows} rows, counted with the model's tokenizer.json "
            "(without the chat template's markup)"
        )
    else:
        notes.append(
            f"prompt lengths: the first {lengths.rows} rows, {CHARS_PER_TOKEN:g} characters a token (no "
            "tokenizer.json at hand); the true count depends on the tokenizer"
        )
    warnings += prompt_length_warnings(lengths, config.max_prompt_length)
    notes.append("completions are counted at max_completion_length, an upper bound: the time too")
    per_prompt = lengths.mean + config.max_completion_length
    per_step = math.ceil(config.prompts_per_step * config.group_size * per_prompt)
    tokens = EstimateTokens(
        prompt_tokens_mean=round(lengths.mean, 1),
        prompt_tokens_max=lengths.longest,
        prompt_tokens_from=lengths.measured_with,
        prompts_sampled=lengths.rows,
        prompts_truncated=round(lengths.truncated, 4),
        completion_tokens_max=config.max_completion_length,
        per_step=per_step,
        total=per_step * config.max_steps,
    )

    measured = measured_throughput(session=session, owner=owner, base_model=base_model, gpus=gpus)
    if measured is not None:
        rate, jobs = measured
        source = (
            f"your {jobs} latest finished job(s) of this base_model on {devices(gpus)} on this server "
            "(their tokens_per_second)"
        )
    else:
        rate, source = step_rate(settings, shape, gpus)
    if gpus > 1 and shape is not None:
        notes.append(
            f"memory: one device's of the {gpus}, each holding 1/{gpus} of the weights, gradients and "
            "optimizer state (FSDP2 shards), generating and training its share of the prompts, and "
            "gathering the full weights to generate and, to train, the root and two layers at a time "
            "(padded rows) or the whole model (lean rows), as fsdp_reshard says or, on auto, whichever "
            "holds less"
        )
    seconds = per_step / rate
    time = EstimateTime(
        tokens_per_second=rate,
        tokens_per_second_from=source,
        seconds_per_step=seconds,
        total_seconds=seconds * config.max_steps,
    )
    warnings += context_warnings(config, shape)
    return JobEstimate(
        base_model=base_model,
        gpus=gpus,
        tokens=tokens,
        memory=memory(config, shape, lengths.mean, settings, gpus=gpus) if shape is not None else None,
        time=time,
        warnings=warnings,
        notes=notes,
    )


def devices(gpus: int) -> str:
    return "1 device" if gpus == 1 else f"{gpus} devices"


def step_rate(settings: Settings, shape: ModelShape | None, gpus: int) -> tuple[float, str]:
    """The tokens per second a job of ``gpus`` devices is assumed to train at, without a finished
    job to measure it by, and where that comes from: GRPO_WORKER_TOKENS_PER_S (one device's)
    scaled inversely with the model's size and, on GPUs, by ``gpus``: each process generates and
    trains its own share of the step's prompts, so N devices take at best 1/N of the time (the
    exchange of groups and weights, and the busiest process's share, make it longer). CPU
    "devices" are processes sharing the machine's cores (``trainer.distributed.launch`` splits
    them): no faster than one."""
    rate = settings.worker_tokens_per_s
    source = f"GRPO_WORKER_TOKENS_PER_S ({settings.worker_tokens_per_s:g} tokens/s"
    if shape is not None:
        rate = settings.worker_tokens_per_s * settings.worker_tokens_per_s_params / shape.parameters
        source += (
            f" at {settings.worker_tokens_per_s_params:.3g} parameters, scaled to this model's "
            f"{shape.parameters:.3g})"
        )
    else:
        source += ", not scaled: the model's size is unknown)"
    if gpus > 1 and settings.worker_device == "cuda":
        rate *= gpus
        source += f", times {gpus} devices: the step's prompts split evenly, at best"
    elif gpus > 1:
        source += f"; {gpus} processes on CPUs share its cores, no faster than one"
    return rate, source
