"""Checkpoints: a Hugging Face model directory (or a peft adapter) that ``from_pretrained`` loads
as it is, plus ``trainer_state/`` with what an exact resume needs (optimizer, scheduler, RNG,
prompt order, step).

A checkpoint is written under a temporary name (``.tmp-step-…``) and renamed to ``step-NNNNNN``
only once complete, so a listed checkpoint is always whole; a crash leaves only a temp directory,
which the next save removes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.layout import CHECKPOINT_NAME, STATE_DIR, checkpoint_name


def checkpoints_on_disk(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and (path / STATE_DIR / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints_on_disk(output_dir)
    return found[-1][1] if found else None


@dataclass
class TrainingState:
    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    extra: dict[str, Any]  # JSON-able: prompt sampler position, the config that wrote it


def save_checkpoint(output_dir: str | Path, policy, tokenizer, state: TrainingState) -> Path:
    """Write a complete checkpoint for ``state.step`` (``prune_checkpoints`` then drops old ones)."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.step)
    tmp = root / f".tmp-{final.name}"
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        state_dir = tmp / STATE_DIR
        state_dir.mkdir()
        torch.save(state.optimizer, state_dir / "optimizer.pt")
        torch.save(state.scheduler, state_dir / "scheduler.pt")
        torch.save(state.rng, state_dir / "rng.pt")
        (state_dir / "state.json").write_text(json.dumps({"step": state.step, **state.extra}, indent=2))
        if final.exists():  # a replayed step after a resume: the newer one wins
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(
    output_dir: str | Path,
    *,
    keep_last: int,
    keep_steps: Collection[int] = (),
    on_removed: Callable[[int], None],
) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (0: keep all), never those of
    ``keep_steps`` (the best one by evaluation), and tell ``on_removed`` each step deleted.
    Separate from ``save_checkpoint``: a failure of ``on_removed`` (the job record unreachable)
    is not a failure to write, which a full disk is told apart from."""
    if keep_last <= 0:
        return
    for step, old in checkpoints_on_disk(output_dir)[:-keep_last]:
        if step not in keep_steps:
            # Reported even if something in it could not be deleted: a half-deleted checkpoint
            # is no longer one to offer, and the next prune tries it again.
            shutil.rmtree(old, ignore_errors=True)
            on_removed(step)


def load_training_state(path: str | Path) -> TrainingState:
    state_dir = Path(path) / STATE_DIR
    extra = json.loads((state_dir / "state.json").read_text())
    return TrainingState(
        step=extra.pop("step"),
        optimizer=torch.load(state_dir / "optimizer.pt", weights_only=True),
        scheduler=torch.load(state_dir / "scheduler.pt", weights_only=True),
        rng=torch.load(state_dir / "rng.pt", weights_only=False),
        extra=extra,
    )


def load_policy_weights(policy, path: str | Path, uses_lora: bool) -> None:
    """Put the weights saved in checkpoint ``path`` into ``policy`` (loaded from the base model)."""
    if uses_lora:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(policy, load_peft_weights(str(path)))
        return
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(path, dtype=next(policy.parameters()).dtype)
    policy.load_state_dict(saved.state_dict())


def export_merged(adapter_checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Merge a LoRA checkpoint into its base model and save a plain Hugging Face model directory."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_checkpoint))
    merged = model.merge_and_unload()
    merged.save_pretrained(output_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_checkpoint).save_pretrained(output_dir)
    return Path(output_dir)
