"""Which models a job may load: a Hugging Face hub id, or a directory under one the operator allows.

A tenant writes ``base_model`` and a ``reward_model``'s ``model``; a local path there would let
them load anything the worker can read — another owner's checkpoint in the artifact store above
all. So a local path counts only when it resolves (symlinks followed) under one of the operator's
``GRPO_MODEL_DIRS`` and outside the artifact store. The API checks at creation and the worker
again before loading (a spec may be older than the settings). Torch-free: both sides import it.

Every refusal reads the same whatever is on disk (missing, unreadable, not a model, outside the
allowed directories, in the artifact store), so the answer tells nobody which paths exist. A hub
id is one whatever else is on the API's disk; only when it also names an allowed model directory
(which the tenant could load anyway) is it refused, asking for that directory written as a path.
``from_pretrained`` (and vLLM) would load a directory of that name relative to the loading
process's current directory instead of the hub's repository; the process about to load one
refuses it then (``check_loadable_here``): a worker, whose current directory is the operator's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from trainer.config import ConfigError

# Hugging Face's repo id rules (huggingface_hub.utils.validate_repo_id): "name" or "org/name",
# each part of letters, digits, "_", "-" and ".", starting and ending with a letter, digit or
# "_", without "--" or "..", at most 96 characters; and no ".git" at the end.
HUB_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
SHOWN_CHARS = 200  # of a refused value, in the message
CONFIG_READ_LIMIT = 1 << 20  # bytes of a config.json read to learn its architecture
# The heads GRPO can train: a causal LM's (a multimodal model's ...ForConditionalGeneration too, as
# AutoModelForCausalLM loads it), unless the config is an encoder-decoder's (T5, BART, Whisper).
CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def is_hub_id(value: str) -> bool:
    parts = value.split("/")
    return (
        len(parts) <= 2
        and all(HUB_PART.fullmatch(part) for part in parts)
        and "--" not in value
        and ".." not in value
        and not value.endswith(".git")
    )


def refusal(value: str) -> str:
    shown = value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "…"
    return (
        f"{shown!r} is neither a Hugging Face hub id (org/name) nor a model directory (with a config.json) "
        "under one this server allows (its operator lists them in GRPO_MODEL_DIRS)"
    )


def _is_within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _allowed_directory(value: str, model_dirs: Iterable[Path], artifact_dir: Path) -> bool:
    """Whether ``value`` names a model directory under ``model_dirs`` and outside ``artifact_dir``.
    Any error reading the disk (permissions, names too long, NUL bytes) is a no."""
    try:
        path = Path(value).expanduser().resolve()
        if _is_within(path, artifact_dir.resolve()):
            return False
        if not any(_is_within(path, Path(directory).expanduser().resolve()) for directory in model_dirs):
            return False
        return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def names_hub(value: str) -> bool:
    """Whether ``value`` is read as a hub id: shaped like one, and not like a path (``/``, ``.``,
    ``~``). Decided from the text alone, never from the disk: a local model directory is written as
    a path (``/models/qwen``, ``./org/name``)."""
    return not value.startswith(("/", ".", "~")) and is_hub_id(value)


def check_model(value: str, *, param: str, model_dirs: Sequence[Path], artifact_dir: Path) -> None:
    """``ConfigError(param, ...)`` unless ``value`` is a hub id or an allowed model directory.

    A value that looks like a path (``/``, ``.``, ``~``) is a path; a hub id is accepted as one
    without looking at the disk (``check_loadable_here`` is the loading process's check; a new
    job's models are also asked ``check_written_as_path``).
    """
    if names_hub(value):
        return
    if not _allowed_directory(value, model_dirs, artifact_dir):
        raise ConfigError(param, refusal(value))


def check_written_as_path(value: str, *, param: str, model_dirs: Sequence[Path], artifact_dir: Path) -> None:
    """``ConfigError(param, ...)`` when ``value`` is a hub id that also names an allowed model
    directory relative to the current directory (``models/qwen`` with ``GRPO_MODEL_DIRS=models``):
    read as a hub id, the worker would refuse it as shadowed (``check_loadable_here``), so the job
    is refused when created (``check_job_models``; the training worker asks again), asking for the
    directory written as a path. The answer tells a tenant nothing they could not learn by loading
    it; a hub id naming anything else on disk (or nothing) is not refused. Not asked when serving an
    existing job's base model: its author cannot change it, and the inference worker's log says
    why it cannot load (``shadowed_message``)."""
    if names_hub(value) and _allowed_directory(value, model_dirs, artifact_dir):
        raise ConfigError(param, ambiguous_message(value))


def ambiguous_message(value: str) -> str:
    """The refusal of a hub id that also names an allowed model directory (``check_written_as_path``)."""
    return (
        f"{value!r} is a Hugging Face hub id as written, and also a model directory this server "
        "allows, relative to its current directory: a hub id is read as the hub's repository, so "
        f"write a local model directory as a path: './{value}' (or its absolute path)"
    )


def hub_id_shadowed(value: str) -> bool:
    """Whether ``value`` is a hub id that also names something relative to this process's current
    directory: ``from_pretrained`` (and vLLM) look there first (``os.path.isdir``, and ``isfile``
    for a config) and would load that, not the hub's repository. A dangling symlink counts (its
    target may appear); a name ``lstat`` cannot read does not, as ``isdir`` reads it so too."""
    return names_hub(value) and os.path.lexists(value)


def shadowed_message(value: str) -> str:
    return (
        f"{value!r} is a Hugging Face hub id, but this worker's current directory holds a path of that "
        "name, which transformers would load instead of the hub's repository, so the worker refuses "
        "to load it. The operator can start the workers from a directory without it (a model "
        f"directory this server allows is written as a path: './{value}' or an absolute one)"
    )


def check_loadable_here(value: str, *, param: str) -> None:
    """In a process about to load ``value`` (a worker's): ``ConfigError(param, ...)`` when it is a
    hub id shadowed by a path relative to the current directory (``hub_id_shadowed``).

    The API never asks: its answer would tell a tenant which paths exist on the server. Nor does
    the worker change directory to one that holds nothing: it trains in its pool's process, whose
    other threads (the heartbeat) and relative settings (``GRPO_DATA_DIR=var``, ``.env``) use the
    current directory, as the job's torchrun processes do. The vLLM engines it starts run in a
    fresh temporary directory of their own."""
    if hub_id_shadowed(value):
        raise ConfigError(param, shadowed_message(value))


def check_causal_lm(value: str, *, param: str) -> None:
    """``ConfigError(param, ...)`` when an allowed local model directory's ``config.json`` shows a
    model without a causal-LM head (``BertForMaskedLM``, ``T5ForConditionalGeneration``, a
    ``...ForSequenceClassification``, a bare ``LlamaModel``): transformers would load it with a
    head it does not have, or not at all. A hub id, an adapter directory, or a config that does
    not say (no ``architectures``, unreadable) is left to the worker's load."""
    if names_hub(value):
        return
    try:
        with (Path(value).expanduser() / "config.json").open("rb") as file:
            config = json.loads(file.read(CONFIG_READ_LIMIT))
    except (OSError, ValueError):
        return
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if (
        not isinstance(architectures, list)
        or not architectures
        or not all(isinstance(a, str) for a in architectures)
    ):
        return
    encoder_decoder = config.get("is_encoder_decoder") is True
    if not encoder_decoder and any(a.endswith(CAUSAL_HEADS) for a in architectures):
        return
    shown = ", ".join(a[:SHOWN_CHARS] for a in architectures[:5])
    why = "an encoder-decoder model" if encoder_decoder else "a model without a causal language-model head"
    raise ConfigError(
        param,
        f"the model directory's config.json names {shown}: {why}, which GRPO cannot train. Use a "
        "decoder-only model whose architecture is a ...ForCausalLM",
    )


def job_models(base_model: str, rewards: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(param, value)`` of the job's ``base_model`` and each ``reward_model`` reward's ``model``."""
    models = [("base_model", base_model)]
    for index, spec in enumerate(rewards):
        if (
            isinstance(spec, dict)
            and spec.get("type") == "reward_model"
            and isinstance(spec.get("model"), str)
        ):
            models.append((f"reward[{index}].model", spec["model"]))
    return models


def check_job_models(
    base_model: str, rewards: Sequence[dict[str, Any]], *, model_dirs: Sequence[Path], artifact_dir: Path
) -> None:
    """The job's ``base_model`` and each ``reward_model`` reward's ``model`` (``reward[i].model``)."""
    for param, value in job_models(base_model, rewards):
        check_model(value, param=param, model_dirs=model_dirs, artifact_dir=artifact_dir)
        check_written_as_path(value, param=param, model_dirs=model_dirs, artifact_dir=artifact_dir)
        if param == "base_model":
            check_causal_lm(base_model, param="base_model")


def check_job_models_loadable_here(base_model: str, rewards: Sequence[dict[str, Any]]) -> None:
    """``check_loadable_here`` for each of the job's models, in the worker about to load them."""
    for param, value in job_models(base_model, rewards):
        check_loadable_here(value, param=param)
