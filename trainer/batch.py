"""One step's batch: the scored groups of a rollout, and how they are cut into micro-batches for
the forward/backward passes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.logprobs import Group


@dataclass
class ScoredGroups:
    """Prompts, their G completions each, and the rewards. Completions of a prompt are adjacent."""

    row_indices: list[int]  # [B] dataset rows
    prompt_ids: list[torch.Tensor]  # B x [P_b]
    completion_ids: list[torch.Tensor]  # B*G x [L_i]
    prompts: list[str]  # [B] formatted prompt text
    completions: list[str]  # [B*G] decoded completion text
    truncated: torch.Tensor  # [B*G] bool
    rewards: torch.Tensor  # [B*G] weighted total
    parts: dict[str, list[float | None]]  # per reward function, [B*G]
    errors: dict[str, int]
    error_messages: list[str]

    def select(self, groups: list[int], group_size: int) -> ScoredGroups:
        """The sub-batch made of the given groups, in that order."""
        seqs = [b * group_size + g for b in groups for g in range(group_size)]
        return ScoredGroups(
            row_indices=[self.row_indices[b] for b in groups],
            prompt_ids=[self.prompt_ids[b] for b in groups],
            completion_ids=[self.completion_ids[i] for i in seqs],
            prompts=[self.prompts[b] for b in groups],
            completions=[self.completions[i] for i in seqs],
            truncated=self.truncated[seqs],
            rewards=self.rewards[seqs],
            parts={name: [values[i] for i in seqs] for name, values in self.parts.items()},
            errors=dict(self.errors),
            error_messages=list(self.error_messages),
        )

    @staticmethod
    def concat(batches: list[ScoredGroups]) -> ScoredGroups:
        first = batches[0]
        return ScoredGroups(
            row_indices=[r for b in batches for r in b.row_indices],
            prompt_ids=[p for b in batches for p in b.prompt_ids],
            completion_ids=[c for b in batches for c in b.completion_ids],
            prompts=[p for b in batches for p in b.prompts],
            completions=[c for b in batches for c in b.completions],
            truncated=torch.cat([b.truncated for b in batches]),
            rewards=torch.cat([b.rewards for b in batches]),
            parts={name: [v for b in batches for v in b.parts[name]] for name in first.parts},
            errors={name: sum(b.errors.get(name, 0) for b in batches) for name in first.errors},
            error_messages=[m for b in batches for m in b.error_messages][:5],
        )


@dataclass
class MicroBatch:
    groups: list[Group]  # the packed forward's input
    sequences: torch.Tensor  # [S_mb] index in the step's B*G of each completion, in packing order
    seq_index: torch.Tensor  # [N] micro-batch-local completion index of each token
    ref_logps: torch.Tensor | None = None  # [N]
    old_logps: torch.Tensor | None = None  # [N]


def plan_micro_batches(
    batch: ScoredGroups, active: torch.Tensor, group_size: int, token_budget: int
) -> list[MicroBatch]:
    """Cut the step into micro-batches of whole groups, each at most ``token_budget`` padded tokens
    (rows x longest row); only ``active`` [B*G] completions are packed."""
    plans: list[MicroBatch] = []
    current: list[tuple[Group, list[int]]] = []

    def flush() -> None:
        if not current:
            return
        sequences = [i for _, seqs in current for i in seqs]
        lengths = torch.tensor([batch.completion_ids[i].shape[0] for i in sequences])
        plans.append(MicroBatch(
            groups=[g for g, _ in current],
            sequences=torch.tensor(sequences),
            seq_index=torch.repeat_interleave(torch.arange(len(sequences)), lengths),
        ))
        current.clear()

    for b, prompt in enumerate(batch.prompt_ids):
        seqs = [b * group_size + g for g in range(group_size) if active[b * group_size + g]]
        if not seqs:
            continue
        group = Group(prompt=prompt, completions=[batch.completion_ids[i] for i in seqs])
        row_length = prompt.shape[0] + sum(c.shape[0] for c in group.completions)
        width = max([row_length] + [g.prompt.shape[0] + sum(c.shape[0] for c in g.completions) for g, _ in current])
        if current and width * (len(current) + 1) > token_budget:
            flush()
        current.append((group, seqs))
    flush()
    return plans
