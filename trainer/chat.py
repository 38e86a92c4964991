"""Answering chat messages with a loaded model: the prompt as training formats it, then
``transformers``' ``generate`` with OpenAI's sampling parameters.

Greedy when ``temperature`` is 0, else sampling with ``temperature`` and ``top_p`` only (the
model's own generation defaults, such as a ``top_k`` or a repetition penalty, are not applied:
the checkpoint is answered as the trainer sampled it). A temperature above 0 and below
MIN_SAMPLING_TEMPERATURE samples at that floor, as vLLM does. ``stop`` sequences end a choice and
are left out of its text, as OpenAI does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from trainer.config import MIN_SAMPLING_TEMPERATURE, ConfigError
from trainer.model import eos_token_ids
from trainer.prompts import PromptFormatter

STOP_WINDOW_TOKENS = 8  # decoded beyond the longest stop sequence's length when looking for it
# The logits divided by a temperature near 0 overflow (1e-300 made every probability inf or NaN,
# and the request fail). vLLM samples any temperature in (0, MIN_SAMPLING_TEMPERATURE) at it; so
# does this path, so that both backends of the inference worker answer alike.


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop sequence) or "length" (max_tokens, or the context)
    completion_tokens: int


@dataclass(frozen=True)
class Generation:
    choices: list[Choice]
    prompt_tokens: int


class StopOnText(StoppingCriteria):
    """Ends each row once its completion's tail holds one of ``stops``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_tokens: int):
        self.tokenizer, self.stops, self.prompt_tokens = tokenizer, list(stops), prompt_tokens
        self.window = max(len(stop) for stop in stops) + STOP_WINDOW_TOKENS

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        tails = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_tokens :][:, -self.window :],  # [N, <=W]
            skip_special_tokens=True,
        )
        return torch.tensor(
            [any(stop in tail for stop in self.stops) for tail in tails],  # [N]
            dtype=torch.bool,
            device=input_ids.device,
        )


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> list[int]:
    """The messages' token ids exactly as training tokenizes a prompt of these messages: the chat
    template (or the plain fallback) and BOS as the tokenizer adds it. Never cut: the context
    check in generate_chat refuses what does not fit."""
    prompts = PromptFormatter(tokenizer, max_prompt_length=2**62)
    return prompts.ids(list(messages), prompts.text(list(messages)))


@torch.inference_mode()
def generate_chat(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    *,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    n: int = 1,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> Generation:
    """``n`` completions of the chat ``messages``; ``ConfigError("messages", ...)`` when the
    prompt leaves the model no room to answer."""
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([chat_prompt_ids(tokenizer, messages)], device=device)  # [1, P]
    prompt_tokens = prompt_ids.shape[1]
    if prompt_tokens == 0:
        raise ConfigError("messages", "the messages make an empty prompt; give some content")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and prompt_tokens >= context:
        raise ConfigError(
            "messages",
            f"the prompt is {prompt_tokens} tokens; this model reads at most {context} "
            "(prompt and completion together); send shorter messages",
        )
    max_new_tokens = min(max_tokens, context - prompt_tokens) if context is not None else max_tokens
    eos = eos_token_ids(model, tokenizer)
    sample = temperature > 0
    temperature = max(temperature, MIN_SAMPLING_TEMPERATURE)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        num_return_sequences=n,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
    )
    stopping = StoppingCriteriaList([StopOnText(tokenizer, stop, prompt_tokens)] if stop else [])
    if seed is not None:
        torch.manual_seed(seed)
    output = model.generate(
        prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        generation_config=config,
        stopping_criteria=stopping,
    )  # [n, P + <=max_new_tokens]
    completions = output[:, prompt_tokens:].tolist()
    return Generation(
        choices=[finish(tokenizer, ids, eos, stop, max_new_tokens) for ids in completions],
        prompt_tokens=prompt_tokens,
    )


def finish(
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    eos: list[int],
    stop: Sequence[str],
    max_new_tokens: int,
) -> Choice:
    """One generated row as a choice: cut at its first EOS or stop sequence, whichever comes
    first; the padding after a row that ended early is not counted."""
    end = next((i for i, token in enumerate(ids) if token in eos), None)
    kept = ids if end is None else ids[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    found = [text.find(sequence) for sequence in stop if sequence in text]
    if found:
        # the fewest tokens whose text holds a stop sequence (holding one only grows with the prefix)
        low, high = 1, len(kept)
        while low < high:
            middle = (low + high) // 2
            if any(
                sequence in tokenizer.decode(kept[:middle], skip_special_tokens=True) for sequence in stop
            ):
                high = middle
            else:
                low = middle + 1
        return Choice(text=text[: min(found)], finish_reason="stop", completion_tokens=low)
    if end is not None:
        return Choice(text=text, finish_reason="stop", completion_tokens=end + 1)
    return Choice(
        text=text,
        finish_reason="length" if len(ids) >= max_new_tokens else "stop",
        completion_tokens=len(ids),
    )
