"""Checkpoints: a Hugging Face model directory (or a peft adapter) that ``from_pretrained`` loads
as it is, plus ``trainer_state/`` with what an exact resume needs (optimizer, scheduler, RNG,
prompt order, step).

A checkpoint is written under a temporary name (``.tmp-step-…``) and renamed to ``step-NNNNNN``
only once complete, so a listed checkpoint is always whole; a crash leaves only a temp directory,
which the next save removes.

A run on several processes writes the same checkpoint: the weights gathered whole to rank 0, the
optimizer state in ``trainer_state/optimizer/`` by ``torch.distributed.checkpoint`` (each process
its shard, into the same directory: the output directory must be one they all see). One process
writes its optimizer state whole, keyed by parameter name, in ``trainer_state/optimizer.pt`` (as
before, so that a full disk is the ``OSError`` it always was). Either loads into any number of
processes, one included, by resharding.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from trainer.distributed import World
from trainer.errors import TrainingError
from trainer.layout import CHECKPOINT_NAME, STATE_DIR, checkpoint_name

OPTIMIZER_FILE = "optimizer.pt"  # in STATE_DIR: one process's optimizer state, whole (torch.save)
OPTIMIZER_DIR = "optimizer"  # in STATE_DIR: several processes' shards of it (torch.distributed.checkpoint)


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
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    extra: dict[str, Any]  # JSON-able: prompt sampler position, the config that wrote it


def save_checkpoint(
    output_dir: str | Path,
    policy,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    world: World | None = None,
) -> Path:
    """Write a complete checkpoint for ``state.step`` (``prune_checkpoints`` then drops old ones).
    Every process of ``world`` calls it; it returns once the checkpoint is complete."""
    world = world or World()
    root = Path(output_dir) / "checkpoints"
    final = root / checkpoint_name(state.step)
    tmp = root / f".tmp-{final.name}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    world.barrier()  # no process writes its optimizer shard into a directory rank 0 is still clearing
    try:
        weights = gathered_weights(policy, world)
        state_dir = tmp / STATE_DIR
        if world.size == 1:  # the whole state, keyed by parameter name: loads into any number of processes
            state_dir.mkdir(parents=True)
            torch.save(optimizer_state(policy, optimizer), state_dir / OPTIMIZER_FILE)
        else:
            dcp.save(
                {"optimizer": optimizer_state(policy, optimizer)}, checkpoint_id=state_dir / OPTIMIZER_DIR
            )
        if world.is_main:
            with base_use_cache(policy):
                policy.save_pretrained(
                    tmp, safe_serialization=True, **({} if weights is None else {"state_dict": weights})
                )
            tokenizer.save_pretrained(tmp)
            torch.save(state.scheduler, state_dir / "scheduler.pt")
            torch.save(state.rng, state_dir / "rng.pt")
            (state_dir / "state.json").write_text(json.dumps({"step": state.step, **state.extra}, indent=2))
            if final.exists():  # a replayed step after a resume: the newer one wins
                shutil.rmtree(final)
            tmp.rename(final)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    world.barrier()
    return final


def gathered_weights(policy, world: World) -> dict[str, torch.Tensor] | None:
    """The full weights of a policy sharded over several processes, on rank 0's CPU (an empty dict
    on the others; collective); None for one process, whose module holds them whole already."""
    if world.size == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A parameter under two names (an LM head tied to the embedding) comes back as two copies:
    # one tensor again, as the module holds it, so that save_pretrained writes it once.
    names: dict[int, list[str]] = {}
    for name, parameter in policy.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for same in names.values():
        for name in same[1:]:
            if name in weights and same[0] in weights:
                weights[name] = weights[same[0]]
    return weights


def optimizer_state(policy, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (each process's shards of it when sharded):
    what ``torch.distributed.checkpoint`` saves and reshards on load."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(policy, optimizer)


def load_optimizer_state(policy, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Load checkpoint ``path``'s optimizer state into ``optimizer`` (of ``policy``, sharded or
    not, over as many processes as this run has, whatever the run that wrote it had; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state_dir = Path(path) / STATE_DIR
    whole = state_dir / OPTIMIZER_FILE  # one process wrote it
    if whole.is_file():
        # mapped from the file, on the CPU: each tensor is read (and moved to its parameter's
        # device) as it is loaded, not the whole state beside the optimizer's own
        saved = torch.load(whole, weights_only=True, map_location="cpu", mmap=True)
        if all(isinstance(key, str) for key in saved["state"]):  # keyed by parameter name
            if not (dist.is_initialized() and dist.get_world_size() > 1) and _load_by_name(
                policy, optimizer, saved
            ):
                return
            options = StateDictOptions(full_state_dict=True)  # each process takes its shards of it
            set_optimizer_state_dict(policy, optimizer, saved, options=options)
            return
        # keyed by parameter index: written before checkpoints could move between process counts
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise TrainingError(
                f"{path} predates multi-process checkpoints: resume it on one process (gpus: 1)"
            )
        optimizer.load_state_dict(saved)
        return
    state = {"optimizer": optimizer_state(policy, optimizer)}
    _drop_absent_masters(state, state_dir / OPTIMIZER_DIR)
    with one_process_quiet():
        dcp.load(state, checkpoint_id=state_dir / OPTIMIZER_DIR)
    set_optimizer_state_dict(policy, optimizer, state["optimizer"])


def _load_by_name(policy, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> bool:
    """Load ``saved`` (keyed by parameter name, one process's whole state) straight into
    ``optimizer`` of this one process: without ``set_optimizer_state_dict``, which first fills the
    optimizer with a state of its own (a step on zero gradients) to load into, a second copy of
    the whole state at once. False (nothing loaded) where the names and the optimizer's
    parameters do not pair up one to one, in order."""
    by_name = dict(policy.named_parameters())
    groups, state, index = [], {}, 0
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        return False
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        names = saved_group["params"]
        if len(names) != len(group["params"]) or any(
            by_name.get(name) is not p for name, p in zip(names, group["params"], strict=True)
        ):
            return False
        ids = list(range(index, index + len(names)))
        state.update(
            {i: saved["state"][name] for i, name in zip(ids, names, strict=True) if name in saved["state"]}
        )
        groups.append({**saved_group, "params": ids})
        index += len(names)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return True


def _drop_absent_masters(state: dict[str, Any], checkpoint_dir: Path) -> None:
    """Take out of the template ``state`` the float32 masters (``trainer.optimizer.MASTER``) that
    the checkpoint does not hold: one written before masters existed. Such a parameter's master
    is then made from its weights (loaded before the optimizer), as it would be on a first step;
    ``dcp.load`` would refuse the missing keys."""
    from torch.distributed.checkpoint import FileSystemReader

    from trainer.optimizer import MASTER

    stored = FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata
    for name, entry in state["optimizer"]["state"].items():
        if MASTER in entry and f"optimizer.state.{name}.{MASTER}" not in stored:
            del entry[MASTER]


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


@contextlib.contextmanager
def one_process_quiet() -> Iterator[None]:
    """torch.distributed.checkpoint warns, whenever no process group exists, that it assumes one
    process: which is what a run without one is."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


@contextlib.contextmanager
def base_use_cache(policy) -> Iterator[None]:
    """The model's config with the base model's ``use_cache`` (``trainer.model.load_models`` turns
    it off for training), as a checkpoint's ``config.json`` should say it."""
    config = getattr(policy, "config", None)
    if config is None or not hasattr(policy, "base_use_cache"):
        yield
        return
    training, config.use_cache = config.use_cache, policy.base_use_cache
    try:
        yield
    finally:
        config.use_cache = training


def load_training_state(path: str | Path) -> TrainingState:
    state_dir = Path(path) / STATE_DIR
    extra = json.loads((state_dir / "state.json").read_text())
    return TrainingState(
        step=extra.pop("step"),
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

    from trainer.model import NO_HUB_KERNELS

    saved = AutoModelForCausalLM.from_pretrained(
        path, dtype=next(policy.parameters()).dtype, **NO_HUB_KERNELS
    )
    policy.load_state_dict(saved.state_dict())


def export_merged(adapter_checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Merge a LoRA checkpoint into its base model and save a plain Hugging Face model directory."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from trainer.model import NO_HUB_KERNELS

    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_checkpoint), **NO_HUB_KERNELS)
    merged = model.merge_and_unload()
    merged.save_pretrained(output_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_checkpoint).save_pretrained(output_dir)
    return Path(output_dir)
