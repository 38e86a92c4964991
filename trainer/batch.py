"""One step's batch: the scored groups of a rollout, and how they are cut into micro-batches for
the forward/backward passes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.logprobs import Group, shares_prompt


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
    errors: dict[str, int]  # per reward function, the completions it errored on (each counted once)
    error_messages: list[str]
    prompt_lengths: list[int] = field(
        default_factory=list
    )  # [B] prompt tokens before max_prompt_length cut them
    # B*G x [L_i] float32: each token's log-prob under the sampler (Rollout.sampler_logprobs); None
    # when the sampler gave none
    sampler_logprobs: list[torch.Tensor] | None = None
    sampler_is_policy: bool = False  # Rollout.from_policy: no mismatch correction for these

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
            # an errored part is None: the sub-batch counts its own errors, and names only those
            errors={
                name: sum(self.parts[name][i] is None for i in seqs) if name in self.parts else 0
                for name in self.errors
            },
            error_messages=[
                m
                for m in self.error_messages
                if any(
                    m.startswith(f"{name}: ")
                    and self.parts.get(name) is not None
                    and any(self.parts[name][i] is None for i in seqs)
                    for name in self.errors
                )
            ],
            prompt_lengths=[self.prompt_lengths[b] for b in groups] if self.prompt_lengths else [],
            sampler_logprobs=[self.sampler_logprobs[i] for i in seqs]
            if self.sampler_logprobs is not None
            else None,
            sampler_is_policy=self.sampler_is_policy,
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
            error_messages=list(dict.fromkeys(m for b in batches for m in b.error_messages))[:5],
            prompt_lengths=[n for b in batches for n in b.prompt_lengths]
            if all(b.prompt_lengths for b in batches)
            else [],
            sampler_logprobs=[t for b in batches for t in b.sampler_logprobs]
            if all(b.sampler_logprobs is not None for b in batches)
            else None,
            sampler_is_policy=all(b.sampler_is_policy for b in batches),
        )


@dataclass
class MicroBatch:
    groups: list[Group]  # the packed forward's input
    sequences: torch.Tensor  # [S_mb] index in the step's B*G of each completion, in packing order
    seq_index: torch.Tensor  # [N] micro-batch-local completion index of each token
    ref_logps: torch.Tensor | None = None  # [N]
    old_logps: torch.Tensor | None = None  # [N]
    sampler_logps: torch.Tensor | None = None  # [N] the sampler's log-probs of the tokens
    sampler_is_policy: bool = False  # ScoredGroups.sampler_is_policy
    positions: int = 0  # token positions its scoring holds for the backward, padding included


def group_cost(group: Group, *, share_prompt: bool = True, token_budget: int = 8192) -> int:
    """Token positions whose activations a group's scoring holds for the backward, padding
    included, on the path ``token_logprobs`` takes for it (``shares_prompt``, given the same
    forward ``token_budget``): with the prompt shared, the prompt once and the completions of a
    forward right-padded to its longest, so at most P + n x L_max; one row [prompt, completion] per
    completion otherwise: n x (P + L_max)."""
    lengths = [c.shape[0] for c in group.completions]
    longest, n, plen = max(lengths, default=0), len(lengths), group.prompt.shape[0]
    shared = share_prompt and shares_prompt(plen, lengths, token_budget)
    return plen + n * longest if shared else n * (plen + longest)


def group_costs(
    batch: ScoredGroups,
    active: torch.Tensor,
    group_size: int,
    *,
    share_prompt: bool = True,
    token_budget: int = 8192,
    one_forward: bool = False,
) -> list[int]:
    """[B] each group's ``group_cost`` over its ``active`` [B*G] completions (0: none active); with
    ``one_forward``, its rows padded to its longest: n x (P + L_max)."""
    costs = []
    for b, prompt in enumerate(batch.prompt_ids):
        completions = [
            batch.completion_ids[b * group_size + g] for g in range(group_size) if active[b * group_size + g]
        ]
        if not completions:
            costs.append(0)
        elif one_forward:
            costs.append(len(completions) * (prompt.shape[0] + max(c.shape[0] for c in completions)))
        else:
            group = Group(prompt=prompt, completions=completions)
            costs.append(group_cost(group, share_prompt=share_prompt, token_budget=token_budget))
    return costs


def plan_micro_batches(
    batch: ScoredGroups,
    active: torch.Tensor,
    group_size: int,
    token_budget: int,
    *,
    share_prompt: bool = True,
    one_forward: bool = False,
) -> list[MicroBatch]:
    """Cut the step into micro-batches of whole groups whose held autograd graph stays within
    ``token_budget`` token positions (the sum of ``group_cost``; a group over it goes alone); only
    ``active`` [B*G] completions are scored. ``token_budget`` is also the scorer's per-forward
    budget (the trainer passes one for both), which decides how a group's forwards are cut and so
    whether its prompt is shared. With ``one_forward`` (``Scoring.one_forward``) a micro-batch is
    one right-padded forward: its cost is its rows x its longest row. How the step is cut changes
    no result: the loss is normalised by whole-step counts."""
    plans: list[MicroBatch] = []
    current: list[tuple[Group, list[int]]] = []
    held = 0  # the current micro-batch's cost
    rows, width = 0, 0  # one_forward: the current micro-batch's rows and longest row

    def flush() -> None:
        if not current:
            return
        sequences = [i for _, seqs in current for i in seqs]
        lengths = torch.tensor([batch.completion_ids[i].shape[0] for i in sequences])
        plans.append(
            MicroBatch(
                groups=[g for g, _ in current],
                sequences=torch.tensor(sequences),
                seq_index=torch.repeat_interleave(torch.arange(len(sequences)), lengths),
                sampler_logps=torch.cat([batch.sampler_logprobs[i] for i in sequences])
                if batch.sampler_logprobs is not None
                else None,
                sampler_is_policy=batch.sampler_is_policy,
                positions=held,
            )
        )
        current.clear()

    for b, prompt in enumerate(batch.prompt_ids):
        seqs = [b * group_size + g for g in range(group_size) if active[b * group_size + g]]
        if not seqs:
            continue
        group = Group(prompt=prompt, completions=[batch.completion_ids[i] for i in seqs])
        if one_forward:
            longest = prompt.shape[0] + max(c.shape[0] for c in group.completions)
            cost = (rows + len(seqs)) * max(width, longest) - held  # what adding the group adds
        else:
            cost = group_cost(group, share_prompt=share_prompt, token_budget=token_budget)
        if current and held + cost > token_budget:
            flush()
            held, rows, width = 0, 0, 0
            if one_forward:
                cost = len(seqs) * longest
        current.append((group, seqs))
        held += cost
        if one_forward:
            rows, width = rows + len(seqs), max(width, longest)
    flush()
    return plans
