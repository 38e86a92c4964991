"""``Sharding``'s training state on two gloo processes (``torch.multiprocessing``): gathered, a
process holds no shard of its own beside the full weights; while a step trains, a process holds the
full weights of the layer that runs (and the one FSDP prefetches), not the model's; every gradient
ends summed into the shards, equal to one process's over all the micro-batches; a process with
fewer micro-batches than the other runs empty ones and adds nothing.
"""

from __future__ import annotations

import json
import math
import os
import socket
from datetime import timedelta
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


def rendezvous() -> str:
    """A TCP store on a free local port for the spawned processes (as torchrun's: a file store's
    cleanup at exit races between processes and can abort one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def train_on_rank(rank: int, init_method: str, model_dir: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        layers = decoder_layers(model)  # before fully_shard renames their classes
        sharding = Sharding(World(rank=rank, size=2, device=torch.device("cpu")), model)
        held: list[int] = []
        for layer in layers:
            layer.register_forward_pre_hook(lambda module, args: held.append(gathered_layers(layers)))
        # gathered, a process frees its own shard of the weights (the full weights hold the same
        # numbers) and gets it back, the same, when resharded
        shards = dict(model.named_parameters())  # this process's shards (DTensors)
        before = {name: p.to_local().clone() for name, p in shards.items()}
        sharding.gather()
        dropped = all(p.to_local().untyped_storage().size() == 0 for p in shards.values())
        sharding.reshard()
        restored = all(torch.equal(p.to_local(), before[name]) for name, p in shards.items())
        scoring = Scoring(one_forward=True)
        mine = [micro_batch(10 * rank + i, *spec) for i, spec in enumerate(MICRO_BATCHES[rank])]
        # auto: layer by layer unless the padding's activations outweigh the layers' weights and
        # gradients; the busiest process's padding decides for all
        choices = [
            sharding.choose("auto", 10 if rank == 0 else 0, 0, 1),
            sharding.choose("auto", 0 if rank == 0 else sharding.layer_bytes, 0, 1),
            # rank 0's largest padded, rank 1's largest lean: the gap is between the two maxima
            sharding.choose("auto", sharding.layer_bytes if rank == 0 else 0, 0 if rank == 0 else 10, 1),
            sharding.choose("step", 0, 0, 1),
        ]
        assert sharding.choose("layer", sharding.layer_bytes * 10, 0, 1)
        gap = sharding.micro_batch_gap(len(mine))
        root = [name for name in shards if ".layers." not in name]  # embeddings, final norm, LM head
        with sharding.training():
            # the root, gathered for the phase, without its own shard meanwhile
            dropped = dropped and all(shards[n].to_local().untyped_storage().size() == 0 for n in root)
            for prompts, completions in mine:
                loss_of(model, prompts, completions, scoring).backward()
            for _ in range(gap):
                sharding.idle_pass(scoring)
        restored = restored and all(torch.equal(shards[n].to_local(), before[n]) for n in root)
        after = gathered_layers(layers)
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}  # collective
        if rank == 0:
            torch.save(grads, Path(out_dir) / "grads.pt")
        (Path(out_dir) / f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "gap": gap,
                    "held": held,
                    "after": after,
                    "layers": len(layers),
                    "choices": choices,
                    "dropped": dropped,
                    "restored": restored,
                }
            )
        )
        dist.barrier()  # both done before the group goes
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_training_holds_a_layer_at_a_time_and_sums_every_process_gradients(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model", num_layers=4)
    mp.spawn(train_on_rank, args=(rendezvous(), str(model_dir), str(tmp_path)), nprocs=2)

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["choices"] for r in reports] == [[True, False, True, False]] * 2
    assert [r["gap"] for r in reports] == [0, 1]  # rank 1 ran one empty micro-batch
    for report in reports:
        assert report["dropped"] and report["restored"]
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


# Rank 1's group has nothing to train (advantage 0 under beta 0, or every completion masked as
# truncated): no micro-batch, only empty ones, after rank 0 alone ran a pass with no gradient
# through the layers (pi_old with num_iterations 2; LoRA's reference, the adapters off).
NOTHING_TO_TRAIN = {
    "pi_old": dict(beta=0.0, num_iterations=2),
    "lora_reference": dict(
        beta=0.04, mask_truncated_completions=True, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]}
    ),
}


def optimize_step(case: str, model_dir: str, world: World | None):
    """One ``optimize`` over a fixed two-group batch: rank 0 gets group 0, rank 1 group 1 (both
    with ``world`` None: one process); -> (stats, micro-batches this process trained)."""
    from trainer.batch import ScoredGroups
    from trainer.config import GRPOConfig
    from trainer.loop import optimize, plan_training
    from trainer.model import load_models

    cfg = GRPOConfig.from_dict(
        dict(group_size=2, prompts_per_step=2, max_completion_length=8, scale_rewards="none")
        | {"fsdp_reshard": "layer"}
        | NOTHING_TO_TRAIN[case]
    )
    torch.manual_seed(0)  # the same LoRA adapters on every process, as the trainer seeds them
    models = load_models(model_dir, cfg, torch.device("cpu"))
    sharding = Sharding(world or World(), models.policy, models.reference)
    params = [p for p in models.policy.parameters() if p.requires_grad]
    prompts = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11])]
    completions = [
        torch.tensor([12, 13, 14]),
        torch.tensor([15, 16]),
        torch.tensor([17, 18, 19]),
        torch.tensor([21]),
    ]
    batch = ScoredGroups(
        row_indices=[0, 1],
        prompt_ids=prompts,
        completion_ids=completions,
        prompts=["a", "b"],
        completions=["x"] * 4,
        truncated=torch.tensor([False, False, True, True]),
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.5]),
        parts={},
        errors={},
        error_messages=[],
    )
    advantages = torch.tensor([0.5, -0.5, 0.0, 0.0])  # group 1: nothing to learn
    trainable = ~batch.truncated if cfg.mask_truncated_completions else advantages != 0
    mine = trainable & (world or World()).sequences(2, 2)
    sharding.gather()  # as after generation
    micro_batches, step_models = plan_training(batch, mine, models, cfg, sharding)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stats = optimize(
        step_models,
        micro_batches,
        advantages,
        cfg,
        num_sequences=4,
        num_tokens=int(sum(c.shape[0] for c, t in zip(completions, trainable, strict=True) if t)),
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        sharding=sharding,
    )
    return stats, len(micro_batches)


def optimize_on_rank(rank: int, init_method: str, case: str, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a collective that never pairs fails in a minute, not the trainer's 30
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        stats, count = optimize_step(case, model_dir, World(rank=rank, size=2, device=torch.device("cpu")))
        (Path(out_dir) / f"{case}-rank{rank}.json").write_text(
            json.dumps({"stats": stats, "micro_batches": count})
        )
        dist.barrier()  # both done before the group goes (a rank aborted once in teardown, SIGABRT)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(NOTHING_TO_TRAIN))
def test_a_process_with_nothing_to_train_pairs_its_collectives(case, tiny_model_dir, tmp_path):
    torch.set_num_threads(1)
    mp.spawn(optimize_on_rank, args=(rendezvous(), case, str(tiny_model_dir), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{case}-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["micro_batches"] for r in ranks] == [1, 0]
    one, _ = optimize_step(case, str(tiny_model_dir), None)
    for rank in ranks:
        for name in ("loss", "grad_norm"):
            assert math.isclose(rank["stats"][name], one[name], rel_tol=1e-5, abs_tol=1e-6), name


def test_the_groups_a_step_trains_are_dealt_so_that_every_process_has_as_much_work():
    worlds = [World(rank=rank, size=2) for rank in (0, 1)]

    def loads(costs: list[int]) -> list[int]:
        owned = torch.stack([w.sequences(len(costs), 3, costs).view(-1, 3)[:, 0] for w in worlds])  # [2, B]
        assert owned.sum(0).tolist() == [1] * len(costs)  # each group trained by exactly one process
        return [int(torch.tensor(costs)[row].sum()) for row in owned]

    # the costliest first, each to the less loaded: 50 / 49 / 2 / 1 -> 51 and 51 (b mod 2: 99 and 3)
    assert loads([50, 1, 49, 2]) == [51, 51]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # no process more than the costliest group above another
        costs = torch.randint(0, 200, (8,), generator=g).tolist()  # a 0: a group that trains nothing
        first, second = loads(costs)
        assert abs(first - second) <= max(costs)
    # without costs: each process trains the groups it generated (b mod 2)
    assert worlds[1].sequences(4, 2).tolist() == [False, False, True, True, False, False, True, True]
