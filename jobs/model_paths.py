"""Which models a job may load: a Hugging Face hub id, or a directory under one the operator allows.

A tenant writes ``base_model`` and a ``reward_model``'s ``model``; a local path there would let
them load anything the worker can read — another owner's checkpoint in the artifact store above
all. So a local path counts only when it resolves (symlinks followed) under one of the operator's
``GRPO_MODEL_DIRS`` and outside the artifact store. The API checks at creation and the worker
again before loading (a spec may be older than the settings). Torch-free: both sides import it.

Every refusal reads the same whatever is on disk (missing, unreadable, not a model, outside the
allowed directories, in the artifact store), so the answer tells nobody which paths exist.
"""

from __future__ import annotations

import json
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


def check_model(value: str, *, param: str, model_dirs: Sequence[Path], artifact_dir: Path) -> None:
    """``ConfigError(param, ...)`` unless ``value`` is a hub id or an allowed model directory.

    A value that looks like a path (``/``, ``.``, ``~``) is a path. So is a hub id that names a
    directory relative to the current one: ``from_pretrained`` would load that directory, not the
    hub's repository.
    """
    looks_like_path = value.startswith(("/", ".", "~"))
    if not looks_like_path and is_hub_id(value):
        try:
            local = Path(value).exists()
        except (OSError, ValueError):
            local = True  # unreadable: refuse like any path we cannot vouch for
        if not local:
            return
    if not _allowed_directory(value, model_dirs, artifact_dir):
        raise ConfigError(param, refusal(value))


def check_causal_lm(value: str, *, param: str) -> None:
    """``ConfigError(param, ...)`` when an allowed local model directory's ``config.json`` shows a
    model without a causal-LM head (``BertForMaskedLM``, ``T5ForConditionalGeneration``, a
    ``...ForSequenceClassification``, a bare ``LlamaModel``): transformers would load it with a
    head it does not have, or not at all. A hub id, an adapter directory, or a config that does
    not say (no ``architectures``, unreadable) is left to the worker's load."""
    if is_hub_id(value) and not value.startswith(("/", ".", "~")) and not Path(value).exists():
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


def check_job_models(
    base_model: str, rewards: Sequence[dict[str, Any]], *, model_dirs: Sequence[Path], artifact_dir: Path
) -> None:
    """The job's ``base_model`` and each ``reward_model`` reward's ``model`` (``reward[i].model``)."""
    check_model(base_model, param="base_model", model_dirs=model_dirs, artifact_dir=artifact_dir)
    check_causal_lm(base_model, param="base_model")
    for index, spec in enumerate(rewards):
        if (
            isinstance(spec, dict)
            and spec.get("type") == "reward_model"
            and isinstance(spec.get("model"), str)
        ):
            check_model(
                spec["model"],
                param=f"reward[{index}].model",
                model_dirs=model_dirs,
                artifact_dir=artifact_dir,
            )
