"""AdamW that keeps a float32 master copy of every half-precision parameter it trains.

A model trained in bfloat16 (``dtype: auto`` on a GPU) cannot take small updates: bfloat16 keeps
8 significant bits, so a weight of 0.02 sits 1.2e-4 from its neighbours and an update of 1e-6
(AdamW's first steps move a weight by about the learning rate) rounds back to the same weight.
Plain AdamW on bfloat16 parameters therefore leaves almost every weight where it was at the
learning rates GRPO uses. This optimizer steps a float32 copy of each such parameter (kept in its
state, beside float32 moments) and writes the copy, rounded, back into the parameter: the model
computes in its own dtype, and the updates add up as they would in float32 (TRL gets the same by
holding float32 weights and computing under autocast). Float32 parameters (LoRA's adapters, a
float32 model) are stepped as plain AdamW steps them.

The state lives where AdamW's does (``optimizer.state[p]``), so checkpoints save it, resume
restores it and ``torch.distributed.checkpoint`` reshards it with no code of its own; loading
keeps it in float32 (``torch.optim.Optimizer`` would cast it to the parameter's dtype).

Gradients stay in the model's dtype (summed over micro-batches and processes, and clipped, in
bfloat16); from the optimizer step on, the arithmetic is float32's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.optim.adamw import adamw

HALF = (torch.bfloat16, torch.float16)
MASTER = "master"  # the state key of a half-precision parameter's float32 copy
CHUNK_ELEMENTS = 1 << 26  # parameters stepped together: ~256 MB of float32 gradients (a larger one alone)


class MasterWeightAdamW(torch.optim.AdamW):
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:  # it makes the gradients: before any is set aside
            with torch.enable_grad():
                loss = closure()
        half = [p for g in self.param_groups for p in g["params"] if p.grad is not None and p.dtype in HALF]
        grads = [p.grad for p in half]
        for p in half:  # AdamW's own step sees only the float32 parameters
            p.grad = None
        try:
            super().step()
        finally:
            for p, grad in zip(half, grads, strict=True):
                p.grad = grad
        stepping = {id(p) for p in half}
        for group in self.param_groups:
            params = [p for p in group["params"] if id(p) in stepping]
            if params:
                self._step_masters(group, params)
        return loss

    def _step_masters(self, group: dict, params: list[torch.Tensor]) -> None:
        """One AdamW step of ``params``' float32 masters on their gradients in float32, then each
        parameter set to its master rounded to the parameter's dtype; a few parameters at a time,
        so that the gradients' float32 copies take about CHUNK_ELEMENTS at once (one parameter
        larger than that: its own size)."""
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        for chunk in _chunks(params, CHUNK_ELEMENTS):
            states = [self._master_state(p, amsgrad) for p in chunk]
            masters = [s[MASTER] for s in states]
            adamw(
                masters,
                [p.grad.float() for p in chunk],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                [s["step"] for s in states],
                amsgrad=amsgrad,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                foreach=group.get("foreach"),
            )
            for p, master in zip(chunk, masters, strict=True):
                p.copy_(master)

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, except that a half-precision parameter's
        float32 values (its master, its moments) are taken as they are: the base class would cast
        them to the parameter's dtype (rounding the master away), and a cast and a copy of the
        whole state beside the loaded one would triple the memory a resume needs."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(
                f"the loaded state has {len(saved_ids)} parameters, this optimizer {len(params)}"
            )
        state = dict(state_dict["state"])
        kept: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for saved_id, p in zip(saved_ids, params, strict=True):
            if p.dtype not in HALF or saved_id not in state:
                continue
            entry = dict(state[saved_id])
            kept[p] = {
                key: entry.pop(key)
                for key in list(entry)
                if key != "step" and torch.is_tensor(entry[key]) and entry[key].dtype == torch.float32
            }
            state[saved_id] = entry
        super().load_state_dict({**state_dict, "state": state})
        for p, values in kept.items():
            for key, value in values.items():
                self.state[p][key] = value.to(device=p.device)  # the same tensor where it already is

    def _master_state(self, p: torch.Tensor, amsgrad: bool) -> dict:
        """``p``'s state: its float32 master and moments, made on its first step (a state loaded
        from a checkpoint written before masters existed gets its master from ``p``)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            elif state[key].dtype != torch.float32:
                state[key] = state[key].float()
        if MASTER not in state:
            state[MASTER] = p.detach().to(torch.float32, copy=True)
        return state


def _chunks(params: list[torch.Tensor], elements: int) -> Iterator[list[torch.Tensor]]:
    """``params`` in order, in runs of at most ``elements`` elements (a larger one alone)."""
    run, size = [], 0
    for p in params:
        if run and size + p.numel() > elements:
            yield run
            run, size = [], 0
        run.append(p)
        size += p.numel()
    if run:
        yield run
