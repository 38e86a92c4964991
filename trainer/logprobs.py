"""Per-token log-probabilities of completions under a causal LM: ``token_logprobs``, the one
scoring path of the policy, reference and old-policy passes.

It equals ``log_softmax(model(prompt + completion).logits / T)`` at the completion's tokens, and is
lean where that stays exact:

1. *The prompt once per group.* The prompt runs through the model once with its KV cache kept in
   the autograd graph; the cache is repeated along the batch dimension for the group's G
   completions, which then run through the model's own forward (so its own mask builder applies
   sliding windows, chunked attention and sinks). The prompt's gradient is the sum over the group,
   exactly what G separate rows would give. Only where it pays (``shares_prompt``): at long
   completions of a short prompt one row ``[prompt, completion]`` per completion costs less (its
   attention runs SDPA's causal kernel, which skips half the pairs). A group's completions run in
   a few forwards of similar lengths, right-padded within each (``_runs``: at short, uneven
   completions one forward per group would pad them to twice their tokens), with their token
   embeddings looked up once for all forwards (one embedding gradient, not one per forward).
   Hybrid caches (linear-attention and conv layers) cannot be repeated: such models score one row
   ``[prompt, completion]`` per completion.
2. *No full-vocabulary tensor.* Only the hidden states that predict completion tokens go through
   the LM head, in chunks, inside an autograd function that keeps no ``[N, V]`` tensor alive (the
   backward recomputes each chunk), followed by the model's own logit transform (Gemma's soft-cap,
   Cohere's and Granite's scales). A model whose head or transform this cannot reproduce uses its
   own full logits.

``check_scoring`` compares the lean path with the plain forward when a model is loaded and picks
the leanest ``Scoring`` that agrees with it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to ``lm_head(hidden)`` before returning its logits:
    ``softcap * tanh(scale * x / softcap)`` (no cap: ``scale * x``)."""

    scale: float = 1.0  # Cohere's logit_scale; 1 / Granite's logits_scaling
    softcap: float | None = None  # Gemma-2/3's final_logit_softcapping

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        scaled = raw * self.scale if self.scale != 1.0 else raw
        return self.softcap * torch.tanh(scaled / self.softcap) if self.softcap else scaled

    def derivative(self, raw: torch.Tensor) -> torch.Tensor | float:
        """d transform / d raw, elementwise (a float where it is constant)."""
        if not self.softcap:
            return self.scale
        return self.scale * (1 - torch.tanh(raw * (self.scale / self.softcap)).square())


class _ChunkedSelectedLogProbs(torch.autograd.Function):
    """The chunked LM head: each chunk's ``[n, V]`` logits are made, used in place and dropped,
    in forward and again in backward (no full-vocabulary tensor outlives its chunk)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy, transform):
        # hidden [N, H], weight [V, H], targets [N]
        logps = hidden.new_empty(targets.shape[0], dtype=torch.float32)  # [N]
        lse = hidden.new_empty(targets.shape[0], dtype=torch.float32)  # [N] kept for backward
        entropy = hidden.new_empty(targets.shape[0] if with_entropy else 0, dtype=torch.float32)  # [N] or [0]
        rows = _chunk_rows(chunk_size, weight.shape[0])
        for start in range(0, targets.shape[0], rows):
            end = start + rows
            logits = _chunk_logits(
                hidden[start:end], weight, transform, temperature
            )  # [n, V], ours to overwrite
            peak = logits.amax(dim=-1, keepdim=True)  # [n, 1]
            shifted = logits.sub_(peak)  # [n, V] logits - peak, in place
            picked = shifted.gather(-1, targets[start:end, None]).squeeze(-1)  # [n]
            if with_entropy:  # H = log(total) - sum(p * shifted), p = exps / total
                exps = torch.exp(shifted)  # [n, V] the one exponential pass
                total = exps.sum(-1)  # [n]
                entropy[start:end] = total.log() - torch.linalg.vecdot(exps, shifted) / total
            else:
                total = shifted.exp_().sum(-1)  # [n]
            log_total = total.log()  # [n]
            lse[start:end] = peak.squeeze(-1) + log_total
            logps[start:end] = picked - log_total
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size, ctx.transform = temperature, chunk_size, transform
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        transform, temperature = ctx.transform, ctx.temperature
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, H]
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None  # [V, H]
        # d logp(target) / d raw = (onehot(target) - softmax(logits)) * d logits / d raw, with
        # d logits / d raw = scale / T (times 1 - tanh^2 under a soft-cap)
        factor = (grad_logps / temperature * (transform.scale if not transform.softcap else 1.0))[
            :, None
        ]  # [N, 1]
        rows = _chunk_rows(ctx.chunk_size, weight.shape[0])
        for start in range(0, targets.shape[0], rows):
            end = start + rows
            if transform.softcap:
                raw = (hidden[start:end] @ weight.T).float()  # [n, V]
                grad_logits = _scaled(transform(raw), temperature)
                grad_logits.sub_(lse[start:end, None]).exp_().neg_()  # [n, V] -softmax
                grad_logits.scatter_add_(-1, targets[start:end, None], torch.ones_like(grad_logits[:, :1]))
                grad_logits.mul_(factor[start:end]).mul_(transform.derivative(raw))
            else:
                grad_logits = _chunk_logits(hidden[start:end], weight, transform, temperature)  # [n, V]
                grad_logits.sub_(lse[start:end, None]).exp_().mul_(
                    factor[start:end].neg()
                )  # -softmax * factor
                grad_logits.scatter_add_(-1, targets[start:end, None], factor[start:end])
            if need_hidden:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.T, hidden[start:end].float())
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


CHUNK_BYTES = 16 << 20  # a chunk's [n, V] float32 logits at most (a row at least)


def _chunk_rows(chunk_size: int, vocab: int) -> int:
    """Rows per LM-head chunk: ``chunk_size`` at most, and few enough that a chunk's logits stay
    within CHUNK_BYTES. Larger blocks come fresh from the OS on every allocation (glibc maps
    blocks over 32 MiB and unmaps them when freed): at 32k vocabulary and 1024 rows, faulting in
    a 131 MB block costs about a third of the matmul that fills it."""
    return max(1, min(chunk_size, CHUNK_BYTES // (4 * vocab)))


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits.div_(temperature) if temperature != 1.0 else logits


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, transform: LogitTransform, temperature: float
) -> torch.Tensor:
    """transform(hidden @ weight.T) / T in float32, a fresh tensor the caller may overwrite.
    [n, H] -> [n, V]"""
    logits = (hidden @ weight.T).float()  # [n, V] (a new tensor: the matmul's output, or its float copy)
    if transform.softcap or transform.scale != 1.0:
        logits = transform(logits)
    return _scaled(logits, temperature)


def selected_logprobs(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    transform: LogitTransform = LogitTransform(),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(transform(lm_head(hidden)) / T)[target] and the distribution's entropy, per row,
    in chunks.

    hidden [N, H], targets [N] -> (logps [N] float32, differentiable; entropy [N] float32, not,
    or None without ``with_entropy``: the reference and old-policy passes need only log-probs).
    """
    if isinstance(lm_head, nn.Linear) and lm_head.bias is None:
        logps, entropy = _ChunkedSelectedLogProbs.apply(
            hidden, lm_head.weight, targets, temperature, chunk_size, with_entropy, transform
        )
        return logps, entropy if with_entropy else None
    # An LM head that is not a plain linear map (e.g. wrapped by an adapter): chunk it all the same,
    # letting autograd keep each chunk's logits.
    logps, entropies = [], []
    for start in range(0, targets.shape[0], chunk_size):
        logits = transform(lm_head(hidden[start : start + chunk_size]).float()) / temperature  # [n, V]
        log_probs = torch.log_softmax(logits, dim=-1)  # [n, V]
        logps.append(log_probs.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1))
        if with_entropy:
            entropies.append(-(log_probs.exp() * log_probs).sum(-1).detach())
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


@dataclass
class Group:
    """One prompt and the completions of it that a forward pass needs (token ids, no padding)."""

    prompt: torch.Tensor  # [P], P >= 1
    completions: list[torch.Tensor]  # each [L_i]


@dataclass(frozen=True)
class Scoring:
    """How ``token_logprobs`` runs a model. The leanest is the default; ``check_scoring`` moves a
    model to a plainer one when the lean one does not reproduce its forward."""

    # the prompt's KV cache computed once per group and repeated for its completions, in the groups
    # where that costs less than one row per completion (``shares_prompt``); False: never
    share_prompt: bool = True
    own_logits: bool = False  # the model's own full logits instead of the chunked LM head and its transform
    # every row [prompt, completion] of the call in one right-padded forward, whatever the groups and
    # the token budget: the same single forward on every process, as FSDP's per-layer collectives
    # need (``trainer.distributed``); overrides ``share_prompt``
    one_forward: bool = False

    def describe(self) -> str:
        rows = "the prompt once per group where it pays" if self.share_prompt else "one row per completion"
        rows = "one padded forward of every row" if self.one_forward else rows
        head = "the model's own full logits" if self.own_logits else "the chunked LM head"
        return f"{rows}, {head}"


PLAIN = Scoring(share_prompt=False, own_logits=True)  # the model's own forward, one row per completion


def token_logprobs(
    model: nn.Module,
    prompts: list[torch.Tensor],
    completions: list[list[torch.Tensor]],
    *,
    temperature: float = 1.0,
    scoring: Scoring | None = None,
    with_entropy: bool = False,
    chunk_size: int = 1024,
    token_budget: int = 8192,
    router_aux_loss: bool = False,
):
    """Per-token log-probs of each completion after its prompt under ``model`` (a Hugging Face
    causal LM, or a peft model around one): ``log_softmax(model(prompt + c).logits / T)`` at c's
    tokens.

    prompts: B x [P_b] token ids; completions: B lists of [L_i] -> B lists of [L_i] float32,
    differentiable. With ``with_entropy`` also the entropies of the same distributions (not
    differentiable), as a second nested list. ``scoring`` defaults to ``default_scoring(model)``;
    a forward pass runs at most ``token_budget`` tokens, padding included (one row at least).
    With ``router_aux_loss`` (a mixture-of-experts model) the result comes as ``(result,
    aux_loss)``: the model's own load-balancing loss over the router logits of every token these
    forwards ran (see ``router_aux_loss``), differentiable.
    """
    causal_lm = _causal_lm(model)
    scoring = scoring or default_scoring(model)
    device = next(model.parameters()).device
    prompts = [p.to(device) for p in prompts]
    completions = [[c.to(device) for c in group] for group in completions]
    lengths = [c.shape[0] for group in completions for c in group]
    if any(p.shape[0] == 0 for p in prompts):
        raise ValueError(
            "every prompt needs at least one token: nothing would predict a completion's first token"
        )
    router: list | None = [] if router_aux_loss else None  # (router logits per layer, token mask) per forward

    if scoring.own_logits:
        pieces = (
            [_own_logits_logprobs(causal_lm, prompts, completions, temperature, with_entropy, router)]
            if scoring.one_forward
            else [
                _own_logits_logprobs(causal_lm, [p], [group], temperature, with_entropy, router, token_budget)
                for p, group in zip(prompts, completions, strict=True)
            ]
        )
        logps = torch.cat([lp for lp, _ in pieces])  # [N]
        entropy = torch.cat([e for _, e in pieces]) if with_entropy else None  # [N]
    else:
        backbone, lm_head = _backbone_and_head(causal_lm)
        if scoring.one_forward:
            hidden = _row_hidden(backbone, prompts, completions, None, router)  # [N, H]
        else:
            shared = [
                scoring.share_prompt and shares_prompt(p.shape[0], [c.shape[0] for c in group], token_budget)
                for p, group in zip(prompts, completions, strict=True)
            ]
            hidden = _hidden(backbone, prompts, completions, shared, token_budget, router)  # [N, H]
        targets = (
            torch.cat([c for group in completions for c in group]) if lengths else hidden.new_empty(0).long()
        )
        logps, entropy = selected_logprobs(
            hidden,
            lm_head,
            targets,
            temperature=temperature,
            chunk_size=chunk_size,
            with_entropy=with_entropy,
            transform=logit_transform(causal_lm.config),
        )
    nested = _nest(logps, lengths, completions)
    result = (nested, _nest(entropy, lengths, completions)) if with_entropy else nested
    return (result, _router_aux_loss(causal_lm, router)) if router is not None else result


def router_aux_loss_coef(model: nn.Module) -> float:
    """The weight of the router's load-balancing loss in the training loss, as TRL adds it: the
    config's ``router_aux_loss_coef`` where it sets ``output_router_logits``, else 0."""
    config = _causal_lm(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "output_router_logits", False):
        return 0.0
    return float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0)


def _router_forward_kwargs(router: list | None) -> dict:
    return {"output_router_logits": True} if router is not None else {}


def _keep_router_logits(router: list | None, out, mask: torch.Tensor, times: int = 1) -> None:
    """Keep a forward's router logits (per layer [rows, E]) with its token mask [rows], ``times``
    over (a prompt shared by that many completions)."""
    if router is not None and getattr(out, "router_logits", None):
        router.append((tuple(r.repeat(times, 1) for r in out.router_logits), mask.reshape(-1).repeat(times)))


def _router_aux_loss(causal_lm: nn.Module, router: list) -> torch.Tensor:
    """The model's own ``load_balancing_loss_func`` over the router logits of every real token the
    forwards ran (padding masked out), each layer's rows laid end to end: the loss of one forward
    over those tokens. A shared prompt counts once per completion, as in one row [prompt,
    completion] per completion (the model's own forward over the padded rows, TRL's): the same
    loss whichever path scored the group. -> [] float32"""
    import sys

    device = next(causal_lm.parameters()).device
    balance = getattr(sys.modules[type(causal_lm).__module__], "load_balancing_loss_func", None)
    experts, top_k = getattr(causal_lm, "num_experts", None), getattr(causal_lm, "num_experts_per_tok", None)
    if not router or balance is None or experts is None or top_k is None:
        return torch.zeros((), device=device)
    layers = tuple(torch.cat([logits[layer] for logits, _ in router]) for layer in range(len(router[0][0])))
    mask = torch.cat([m.to(layers[0].device) for _, m in router])  # [rows]
    return torch.as_tensor(balance(layers, experts, top_k, mask), device=device).float()


def _nest(
    flat: torch.Tensor, lengths: list[int], completions: list[list[torch.Tensor]]
) -> list[list[torch.Tensor]]:
    pieces = iter(flat.split(lengths))  # [N] -> [L_i] each
    return [[next(pieces) for _ in group] for group in completions]


def _hidden(
    backbone: nn.Module,
    prompts: list[torch.Tensor],
    completions: list[list[torch.Tensor]],
    shared: list[bool],
    token_budget: int,
    router: list | None,
) -> torch.Tensor:
    """The hidden states that predict each completion's tokens, each group by its own path: the
    prompt once where ``shared``, one row per completion elsewhere. -> [sum L_i, H], completions in
    order"""
    picked = [b for b, share in enumerate(shared) if share]
    pieces: list[torch.Tensor | None] = [None] * len(prompts)
    if picked:
        states = _shared_prompt_hidden(
            backbone, [prompts[b] for b in picked], [completions[b] for b in picked], token_budget, router
        )  # [sum over the picked groups' L_i, H]
        sizes = [sum(c.shape[0] for c in completions[b]) for b in picked]
        for b, piece in zip(picked, states.split(sizes), strict=True):
            pieces[b] = piece  # [sum L_i of group b, H]
    for b, share in enumerate(shared):
        if not share:
            pieces[b] = _row_hidden(backbone, [prompts[b]], [completions[b]], token_budget, router)
    return torch.cat(pieces) if pieces else backbone.get_input_embeddings().weight.new_empty(0, 0)


def _shared_prompt_hidden(
    backbone: nn.Module,
    prompts: list[torch.Tensor],
    completions: list[list[torch.Tensor]],
    token_budget: int,
    router: list | None = None,
) -> torch.Tensor:
    """The hidden states that predict each completion's tokens, each prompt computed once.
    -> [sum L_i, H], completions in order

    Each prompt's KV cache stays in the autograd graph and is repeated for each run of its
    completions (right-padded to the run's longest; a causal model never looks at the padding
    after a token). Token j of a completion is predicted by the state before it: the prompt's last
    one for j = 0. The token embeddings of all these forwards come from one lookup (``_embedded``)."""
    runs = [_completion_runs(p, group, token_budget) for p, group in zip(prompts, completions, strict=True)]
    inputs = iter(
        _embedded(backbone, [p[None] for p in prompts] + [ids for group in runs for _, ids, _ in group])
    )
    prompt_inputs = [next(inputs) for _ in prompts]
    hidden = []
    for prompt, group, group_runs, prompt_input in zip(
        prompts, completions, runs, prompt_inputs, strict=True
    ):
        out = backbone(**prompt_input, use_cache=True, **_router_forward_kwargs(router))
        _keep_router_logits(router, out, torch.ones_like(prompt), times=len(group))
        cache = _require_repeatable(out.cache)
        last = out.last_hidden_state[0, -1:]  # [1, H]
        plen, states_of = prompt.shape[0], [None] * len(group)
        for run, ids, mask in group_runs:
            states, run_input = last.new_empty(len(run), 0, last.shape[-1]), next(inputs)  # [k, 0, H]
            if ids.shape[1] > 0:
                positions = torch.arange(plen, plen + ids.shape[1], device=prompt.device).expand(
                    len(run), -1
                )  # [k, W]
                out = backbone(
                    **run_input,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=_repeated(cache, len(run)),
                    use_cache=True,
                    **_router_forward_kwargs(router),
                )
                _keep_router_logits(router, out, mask[:, plen:])
                states = out.last_hidden_state  # [k, W, H]
            for r, i in enumerate(run):
                length = group[i].shape[0]
                states_of[i] = torch.cat([last, states[r, : length - 1]])[:length]  # [L_i, H]
        hidden += states_of
    return torch.cat(hidden) if hidden else backbone.get_input_embeddings().weight.new_empty(0, 0)


def _completion_runs(prompt: torch.Tensor, completions: list[torch.Tensor], token_budget: int):
    """The forwards after a shared prompt: (indices, ids [k, W] right-padded, mask [k, P+W]) per run
    of completions, each completion's last token left out (it predicts nothing)."""
    plen, fed = prompt.shape[0], [max(c.shape[0] - 1, 0) for c in completions]
    planned = []
    for run in _runs(fed, token_budget, past=plen):
        width = max(fed[i] for i in run)
        ids = torch.zeros(len(run), width, dtype=torch.long, device=prompt.device)  # [k, W]
        mask = torch.zeros(len(run), plen + width, dtype=torch.long, device=prompt.device)  # [k, P+W]
        mask[:, :plen] = 1
        for r, i in enumerate(run):
            ids[r, : fed[i]] = completions[i][: fed[i]]
            mask[r, plen : plen + fed[i]] = 1
        planned.append((run, ids, mask))
    return planned


def _embedded(backbone: nn.Module, ids: list[torch.Tensor]) -> list[dict]:
    """The model inputs of several forwards: ``inputs_embeds`` from one lookup of all their token
    ids, so the backward forms one dense [V, H] embedding gradient for all of them rather than one
    per forward (at 32k vocabulary each costs about as much as 40 more token positions). A model
    without a plain embedding module gets its ``input_ids``. ids: [k, W] each -> kwargs each"""
    embedding = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Embedding) or not ids:
        return [{"input_ids": m} for m in ids]
    flat = embedding(torch.cat([m.reshape(-1) for m in ids]))  # [sum k W, H]
    return [
        {"inputs_embeds": e.view(*m.shape, flat.shape[-1])}
        for e, m in zip(flat.split([m.numel() for m in ids]), ids, strict=True)
    ]


def _row_hidden(
    backbone: nn.Module,
    prompts: list[torch.Tensor],
    completions: list[list[torch.Tensor]],
    token_budget: int | None,
    router: list | None = None,
) -> torch.Tensor:
    """The same states from one row ``[prompt, completion]`` per completion. -> [sum L_i, H]"""
    flat = [c for group in completions for c in group]
    hidden: list[torch.Tensor | None] = [None] * len(flat)
    for run, ids, mask, starts in _rows(prompts, completions, token_budget):
        out = backbone(input_ids=ids, attention_mask=mask, use_cache=False, **_router_forward_kwargs(router))
        _keep_router_logits(router, out, mask)
        states = out.last_hidden_state  # [k, S, H]
        for r, i in enumerate(run):
            hidden[i] = states[r, starts[r] : starts[r] + flat[i].shape[0]]  # [L_i, H]
    return torch.cat(hidden) if hidden else prompts[0].new_empty(0, 0).float()


def _own_logits_logprobs(
    causal_lm: nn.Module,
    prompts: list[torch.Tensor],
    completions: list[list[torch.Tensor]],
    temperature: float,
    with_entropy: bool,
    router: list | None = None,
    token_budget: int | None = None,
):
    """The plain path: the model's own forward and full logits, one row per completion.
    -> ([sum L_i], [sum L_i])"""
    flat = [c for group in completions for c in group]
    logps: list[torch.Tensor | None] = [None] * len(flat)
    entropies: list[torch.Tensor | None] = [None] * len(flat)
    for run, ids, mask, starts in _rows(prompts, completions, token_budget):
        out = causal_lm(input_ids=ids, attention_mask=mask, use_cache=False, **_router_forward_kwargs(router))
        _keep_router_logits(router, out, mask)
        logits = out.logits  # [k, S, V]
        for r, i in enumerate(run):
            log_probs = torch.log_softmax(
                logits[r, starts[r] : starts[r] + flat[i].shape[0]].float() / temperature, -1
            )  # [L_i, V]
            logps[i] = log_probs.gather(-1, flat[i][:, None]).squeeze(-1)
            entropies[i] = -(log_probs.exp() * log_probs).sum(-1).detach() if with_entropy else None
    empty = prompts[0].new_empty(0, dtype=torch.float32)
    return (torch.cat(logps) if logps else empty), (
        torch.cat(entropies) if with_entropy and entropies else empty
    )


def _rows(prompts: list[torch.Tensor], completions: list[list[torch.Tensor]], token_budget: int | None):
    """Runs of rows ``[prompt_b, c_i[:-1]]`` (c_i among prompt b's completions), right-padded, cut
    by ``_runs`` (None: all in one run). Yields (indices into the flattened completions, ids [k,
    S], mask [k, S], where each row's completion states start [k])."""
    owner = [b for b, group in enumerate(completions) for _ in group]
    flat = [c for group in completions for c in group]
    fed = [max(c.shape[0] - 1, 0) for c in flat]
    sizes = [prompts[owner[i]].shape[0] + fed[i] for i in range(len(flat))]
    runs = _runs(sizes, token_budget) if token_budget is not None else [list(range(len(flat)))]
    device = prompts[0].device
    for run in runs:
        width = max(sizes[i] for i in run)
        ids = torch.zeros(len(run), width, dtype=torch.long, device=device)  # [k, S]
        mask = torch.zeros(len(run), width, dtype=torch.long, device=device)  # [k, S]
        for r, i in enumerate(run):
            ids[r, : sizes[i]] = torch.cat([prompts[owner[i]], flat[i][: fed[i]]])
            mask[r, : sizes[i]] = 1
        yield run, ids, mask, [prompts[owner[i]].shape[0] - 1 for i in run]


RUN_OVERHEAD_TOKENS = 48  # what one more forward costs (its fixed per-call work), in padded token positions


def _runs(sizes: list[int], token_budget: int, past: int | None = None) -> list[list[int]]:
    """Indices of ``sizes`` cut into runs, each run one right-padded forward: longest first, each
    run's rows x longest <= token_budget (a run has one row at least), and the cut that costs
    least (``_forward_work``, padding included) where one more run costs RUN_OVERHEAD_TOKENS
    positions. ``past``: the keys before each row (a shared prompt's cache; its runs attend under
    an explicit mask); None: rows of their own, whose unpadded runs take the causal kernel.

    One run per group pads every completion to the group's longest; at short, uneven completions
    (a median of 15 tokens under a cap of 64) that is twice the real tokens. At long rows a single
    padded position costs the run its causal kernel, half its attention: rows of unequal lengths
    go alone. Sorted, the cheapest cut into consecutive runs is a small dynamic programme (the
    longest of a run is its first)."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    width = [sizes[i] for i in order]
    best = [0] + [None] * len(
        order
    )  # best[j]: the cost of cutting the first j, and where its last run starts
    start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for first in range(end - 1, -1, -1):
            rows = end - first
            if rows > 1 and rows * max(width[first], 1) > token_budget:
                break  # longer runs (an earlier first) only grow
            causal = past is None and width[first] == width[end - 1]  # unpadded
            work = _forward_work(rows, width[first], (past or 0) + width[first], causal=causal)
            cost = best[first] + RUN_OVERHEAD_TOKENS + work
            if best[end] is None or cost <= best[end]:  # ties: the longer run, fewer forwards
                best[end], start[end] = cost, first
    runs, end = [], len(order)
    while end:
        runs.append(order[start[end] : end])
        end = start[end]
    return runs[::-1]


# Query-key pairs of attention that cost as much as one token position's other work (projections,
# MLP, norms), forward + backward. Measured on the realistic benchmark model (hidden 256, 8
# layers, 1 CPU thread, SDPA): ~1.1 us a pair against ~1.35 ms a position (bench/RESULTS.md,
# issue 11). Wider models spend relatively less on attention (a pair costs ~hidden, a position
# ~hidden^2): there this undercounts what sharing saves, and the rule errs towards rows, at most
# by the prompt's recomputation.
ATTENTION_SPAN = 1250


def shares_prompt(prompt_length: int, lengths: list[int], token_budget: int = 8192) -> bool:
    """Whether a group costs less with its prompt computed once (its KV cache repeated for the
    completions) than as one row ``[prompt, completion]`` per completion; ``token_logprobs``
    takes that path for the group under ``Scoring(share_prompt=True)`` and ``group_cost`` sizes
    micro-batches by it.

    Sharing saves the prompt's positions (G - 1 times) but its completions attend under an
    explicit mask (a past cache: queries != keys), so SDPA visits every query-key pair; a row of
    its own without padding runs SDPA's causal kernel, which skips the pairs above the diagonal.
    At long completions of a short prompt that half of the attention outweighs the prompt: on the
    benchmark model (100-token prompt, G = 8, equal lengths) rows win from ~500 tokens. Rows
    padded to a longer neighbour lose the causal kernel (sharing always wins against them), so
    ``_runs`` cuts long rows of unequal lengths into forwards of their own. Rows must save more
    than one forward's fixed cost (RUN_OVERHEAD_TOKENS): a smaller difference is within what this
    model of the cost can tell, and sharing holds fewer positions for the backward.

    prompt_length: P >= 1; lengths: [L_i] the group's completion lengths (none: shares, as
    before the rule, its states coming out empty)."""
    if not lengths:
        return True
    plen, fed = prompt_length, [max(n - 1, 0) for n in lengths]
    shared = _forward_work(1, plen, plen, causal=True) + _runs_work(fed, token_budget, past=plen)
    return shared <= _runs_work([plen + f for f in fed], token_budget) + RUN_OVERHEAD_TOKENS


def _runs_work(sizes: list[int], token_budget: int, past: int | None = None) -> float:
    """The work of the forwards ``_runs`` cuts ``sizes`` into (see there for ``past``)."""
    work = 0.0
    for run in _runs(sizes, token_budget, past):
        width = max(sizes[i] for i in run)
        causal = past is None and all(sizes[i] == width for i in run)  # unpadded
        work += _forward_work(len(run), width, (past or 0) + width, causal=causal)
    return work


def _forward_work(rows: int, width: int, keys: int, *, causal: bool) -> float:
    """One forward's work in token positions: rows x width positions and their attention's
    query-key pairs, every one of them under an explicit mask, the lower triangle (about half)
    under SDPA's causal kernel (no padding, queries = keys)."""
    pairs = rows * width * (width + 1) / 2 if causal else rows * width * keys
    return rows * width + pairs / ATTENTION_SPAN


def _repeated(cache, times: int):
    """A copy of a prompt's cache with its one row repeated ``times`` times; the original stays as
    it is (a forward appends to the copy) and the copy's tensors stay in the autograd graph."""
    repeated = copy.copy(cache)
    repeated.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in repeated.layers:
        layer.batch_repeat_interleave(times)
    return repeated


def _require_repeatable(cache):
    """The cache itself, when it holds only keys and values (full or sliding-window attention)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])}
    if type(cache) is not DynamicCache or not kinds <= {
        DynamicLayer.__name__,
        DynamicSlidingWindowLayer.__name__,
    }:
        raise TypeError(
            f"the prompt's cache ({type(cache).__name__} with {sorted(kinds)}) cannot be repeated "
            "for a group: score one row per completion (Scoring(share_prompt=False))"
        )
    return cache


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _backbone_and_head(causal_lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the transformer whose last hidden state the LM head reads, the LM head) of a causal LM."""
    from transformers import PreTrainedModel

    backbone = causal_lm.base_model
    if backbone is causal_lm:  # a base_model_prefix that names no attribute (Llama-4's text model)
        backbone = next((m for m in causal_lm.children() if isinstance(m, PreTrainedModel)), None)
    head = causal_lm.get_output_embeddings()
    if backbone is None or head is None:
        raise TypeError(
            f"{type(causal_lm).__name__} has no separate backbone and LM head: use its own logits "
            "(Scoring(own_logits=True))"
        )
    return backbone, head


def logit_transform(config) -> LogitTransform:
    """The transform a model applies after its LM head, as its config names it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = float(getattr(text, "logit_scale", None) or 1.0)  # Cohere multiplies
    divisor = getattr(text, "logits_scaling", None)  # Granite divides
    if divisor:
        scale /= float(divisor)
    return LogitTransform(scale=scale, softcap=getattr(text, "final_logit_softcapping", None) or None)


def _repeatable_cache_config(config) -> bool:
    """Whether the cache the model builds holds only keys and values (no conv or recurrent state)."""
    from transformers import DynamicCache

    try:
        _require_repeatable(DynamicCache(config=config))
    except Exception:  # a layer type DynamicCache cannot build from this config is not repeatable either
        return False
    return True


def default_scoring(model: nn.Module) -> Scoring:
    """The leanest scoring the model's structure allows: the prompt once per group unless its cache
    has conv or recurrent state (hybrids) or gradient checkpointing drops caches in training."""
    causal_lm = _causal_lm(model)
    checkpointing = getattr(
        causal_lm, "is_activation_checkpointing", None
    )  # is_gradient_checkpointing before 5.x
    if checkpointing is None:
        checkpointing = getattr(causal_lm, "is_gradient_checkpointing", False)
    share = _repeatable_cache_config(causal_lm.config) and not checkpointing
    try:
        _backbone_and_head(causal_lm)
        own_logits = False
    except TypeError:
        own_logits = True
    return Scoring(share_prompt=share, own_logits=own_logits)


@dataclass
class ScoringCheck:
    scoring: Scoring  # what the run uses
    default: Scoring  # what the model's structure suggested
    mismatches: list[str]  # why each leaner scoring was passed over


def check_scoring(model: nn.Module, *, max_length: int = 512, seed: int = 0) -> ScoringCheck:
    """Compare the lean scoring with the plain forward on a short random sample and keep the
    leanest that agrees, values and gradients (run dtype: 1e-3 in float32, 5e-2 in half precision).

    The sample: a prompt and three completions of unequal lengths, prompt and longest completion
    each longer than the model's sliding window or attention chunk where that fits ``max_length``.
    Raises RuntimeError when not even the plain forward runs."""
    causal_lm = _causal_lm(model)
    text = causal_lm.config.get_text_config()
    window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None) or 8
    long = min(int(window) + 5, max_length // 2)
    g = torch.Generator().manual_seed(seed)
    vocab = int(text.vocab_size)
    prompt = torch.randint(0, vocab, (long,), generator=g)
    completions = [torch.randint(0, vocab, (n,), generator=g) for n in (long, 4, 1)]
    weights = torch.linspace(-1.0, 1.0, sum(c.shape[0] for c in completions))  # [N]
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # a parameter whose gradient flows from the prompt's tokens too; LoRA's B (A's gradient is 0 at init)
    probe = next((p for name, p in trainable if "lora_B" in name), trainable[0][1] if trainable else None)
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)

    def scored(scoring: Scoring) -> tuple[torch.Tensor, torch.Tensor | None]:
        logps = torch.cat(token_logprobs(model, [prompt], [completions], scoring=scoring)[0])  # [N]
        total = (logps * weights.to(logps.device)).sum()
        grad = torch.autograd.grad(total, probe, allow_unused=True)[0] if probe is not None else None
        return logps.detach(), grad

    was_training = model.training
    model.eval()  # no dropout: both sides must be the same function
    try:
        try:
            want, want_grad = scored(PLAIN)
        except Exception as exc:
            raise RuntimeError(
                f"the model's own forward fails on a sample: {type(exc).__name__}: {exc}"
            ) from exc
        default = default_scoring(model)
        candidates = [default, replace(default, share_prompt=False), PLAIN]
        mismatches = []
        for scoring in dict.fromkeys(candidates):  # in order, without repeats
            if scoring == PLAIN:
                return ScoringCheck(scoring=PLAIN, default=default, mismatches=mismatches)
            # sharing where it pays takes either path per group: both must agree (the sample's
            # completions are no longer than its prompt, so ``shares_prompt`` shares it)
            paths = [scoring, replace(scoring, share_prompt=False)] if scoring.share_prompt else [scoring]
            failures = (
                f"{path.describe()}: {why}"
                for path in paths
                if (why := _mismatch(scored, path, want, want_grad, half)) is not None
            )
            failure = next(failures, None)  # the first path that fails; the rest are not run
            if failure is None:
                return ScoringCheck(scoring=scoring, default=default, mismatches=mismatches)
            mismatches.append(failure)
        raise AssertionError("unreachable: PLAIN is the last candidate")
    finally:
        model.train(was_training)


def _mismatch(scored, scoring: Scoring, want, want_grad, half: bool) -> str | None:
    """Why ``scoring`` does not reproduce the plain forward on the check's sample, or None."""
    tolerance = 5e-2 if half else 1e-3
    try:
        got, got_grad = scored(scoring)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    delta = _relative_gap(got, want, got_grad, want_grad, half)
    return f"differs from the model's own forward by {delta:.3g}" if delta > tolerance else None


def _relative_gap(got, want, got_grad, want_grad, half: bool) -> float:
    """How far a scoring is from the plain forward: log-probs (max |d|, mean |d| in half precision,
    where rounding alone moves single tokens) and the probe gradient (|d| / |want|)."""
    diff = (got - want).abs()
    gap = float(diff.mean() if half else diff.max()) if diff.numel() else 0.0
    if want_grad is not None and got_grad is not None:
        gap = max(
            gap, float((got_grad - want_grad).float().norm() / want_grad.float().norm().clamp(min=1e-12))
        )
    elif (want_grad is None) != (got_grad is None):
        gap = float("inf")
    return gap
