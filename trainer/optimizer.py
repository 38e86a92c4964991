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
keeps it in float32 (``torch.optim.Optimizer`` would cast it to the parameter's dtype: hooks on
loading put the float32 values back).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.optim.adamw import adamw

HALF = (torch.bfloat16, torch.float16)
MASTER = "master"  # the state key of a half-precision parameter's float32 copy
CHUNK_ELEMENTS = 1 << 26  # parameters stepped together: their float32 gradients take 256 MB at most


class MasterWeightAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._loading: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self.register_load_state_dict_pre_hook(_keep_float32_state)
        self.register_load_state_dict_post_hook(_restore_float32_state)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        half = [p for g in self.param_groups for p in g["params"] if p.grad is not None and p.dtype in HALF]
        grads = [p.grad for p in half]
        for p in half:  # AdamW's own step sees only the float32 parameters
            p.grad = None
        try:
            loss = super().step(closure)
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
        so that the gradients' float32 copies never take more than CHUNK_ELEMENTS at once."""
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
            )
            for p, master in zip(chunk, masters, strict=True):
                p.copy_(master)

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


def _keep_float32_state(optimizer: MasterWeightAdamW, state_dict: dict) -> None:
    """Before a state is loaded: note the float32 values of half-precision parameters' states
    (``torch.optim.Optimizer.load_state_dict`` casts every floating value to its parameter's dtype,
    which would round the masters and moments)."""
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer._loading = {
        p: {
            key: value
            for key, value in state_dict["state"].get(saved_id, {}).items()
            if key != "step" and torch.is_tensor(value) and value.dtype == torch.float32
        }
        for saved_id, p in zip(saved_ids, params, strict=True)
        if p.dtype in HALF
    }


def _restore_float32_state(optimizer: MasterWeightAdamW) -> None:
    """After a state is loaded: put back the float32 values ``_keep_float32_state`` noted."""
    for p, values in optimizer._loading.items():
        for key, value in values.items():
            optimizer.state[p][key] = value.to(device=p.device, copy=True)
    optimizer._loading = {}
