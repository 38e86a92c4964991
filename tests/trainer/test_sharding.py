"""``Sharding``'s training state on two gloo processes (``torch.multiprocessing``): while a step
trains, a process holds the full weights of the layer that runs (and the one FSDP prefetches), not
the model's; every gradient ends summed into the shards, equal to one process's over all the
micro-batches; a process with fewer micro-batches than the other runs empty ones and adds nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from trainer.distributed import Sharding, World, decoder_layers
from trainer.logprobs import Scoring, token_logprobs
from trainer.tiny import make_tiny_model

# rank 0 trains on two micro-batches, rank 1 on one (so it runs one empty micro-batch)
MICRO_BATCHES = {0: [(5, (3, 4)), (2, (6, 1, 2))], 1: [(7, (2, 5, 3))]}  # (prompt length, completion lengths)


def micro_batch(seed: int, prompt_length: int, lengths: tuple[int, ...]):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, 100, (prompt_length,), generator=g)
    return [prompt], [[torch.randint(4, 100, (n,), generator=g) for n in lengths]]


def all_micro_batches() -> list[tuple]:
    return [
        micro_batch(10 * rank + i, *spec) for rank in (0, 1) for i, spec in enumerate(MICRO_BATCHES[rank])
    ]


def loss_of(model, prompts, completions, scoring) -> torch.Tensor:
    logps = torch.cat(
        [lp for group in token_logprobs(model, prompts, completions, scoring=scoring) for lp in group]
    )
    return (logps * torch.linspace(-1, 1, logps.shape[0])).sum()


def gathered_layers(layers) -> int:
    """How many decoder layers hold their full weights now (FSDP swaps a layer's DTensor shards for
    plain tensors while it is gathered)."""
    return sum(not isinstance(next(layer.parameters()), DTensor) for layer in layers)


def train_on_rank(rank: int, init_file: str, model_dir: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        layers = decoder_layers(model)  # before fully_shard renames their classes
        sharding = Sharding(World(rank=rank, size=2, device=torch.device("cpu")), model)
        held: list[int] = []
        for layer in layers:
            layer.register_forward_pre_hook(lambda module, args: held.append(gathered_layers(layers)))
        scoring = Scoring(one_forward=True)
        mine = [micro_batch(10 * rank + i, *spec) for i, spec in enumerate(MICRO_BATCHES[rank])]
        # auto: layer by layer unless the padding's activations outweigh the layers' weights and
        # gradients; the busiest process's padding decides for all
        choices = [
            sharding.choose("auto", 10 if rank == 0 else 0, 1),
            sharding.choose("auto", 0 if rank == 0 else sharding.layer_bytes, 1),
            sharding.choose("step", 0, 1),
        ]
        assert sharding.choose("layer", sharding.layer_bytes * 10, 1)
        gap = sharding.micro_batch_gap(len(mine))
        with sharding.training():
            for prompts, completions in mine:
                loss_of(model, prompts, completions, scoring).backward()
            for _ in range(gap):
                sharding.idle_pass(scoring)
        after = gathered_layers(layers)
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}  # collective
        if rank == 0:
            torch.save(grads, Path(out_dir) / "grads.pt")
        (Path(out_dir) / f"rank{rank}.json").write_text(
            json.dumps({"gap": gap, "held": held, "after": after, "layers": len(layers), "choices": choices})
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_training_holds_a_layer_at_a_time_and_sums_every_process_gradients(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model", num_layers=4)
    mp.spawn(train_on_rank, args=(str(tmp_path / "init"), str(model_dir), str(tmp_path)), nprocs=2)

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["choices"] for r in reports] == [[True, False, False]] * 2
    assert [r["gap"] for r in reports] == [0, 1]  # rank 1 ran one empty micro-batch
    for report in reports:
        assert report["layers"] == 4
        assert report["held"], "no decoder layer ran"
        assert max(report["held"]) <= 2  # the layer running and at most the one prefetched, of 4
        assert report["after"] == 0  # every layer back to its shard once the step has trained

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for prompts, completions in all_micro_batches():  # one process, the lean default scoring
        loss_of(model, prompts, completions, Scoring()).backward()
    sharded = torch.load(tmp_path / "grads.pt")
    for name, p in model.named_parameters():
        torch.testing.assert_close(sharded[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
