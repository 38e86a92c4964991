"""Prompts as the model gets them: a row's prompt as text (its chat template, or the messages a
line each), its token ids with the BOS its tokenizer adds, cut to ``max_prompt_length`` from the
left as TRL does. A dataset none of whose prompts fits is refused before training; a prompt cut
during training is counted in the step's metrics and named in a few warning events."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from trainer.batch import ScoredGroups
from trainer.config import ConfigError
from trainer.data import RowFile, messages_text
from trainer.errors import DatasetError
from trainer.progress import Progress

# warning events per run naming a prompt cut to max_prompt_length (the metric counts every one)
MAX_TRUNCATION_WARNINGS = 3


def prompt_text(tokenizer: Any, prompt: str | Sequence[dict]) -> str:
    """A prompt as the model reads it, in training and in chat: a string as it is; chat messages
    through the tokenizer's chat template with the generation prompt, or (a tokenizer without one)
    their contents a line each."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return messages_text(prompt)


class PromptFormatter:
    """Formats and tokenizes a row's ``prompt`` (a string, or a list of chat messages) for one
    tokenizer, and cuts it to ``max_prompt_length`` tokens."""

    def __init__(self, tokenizer: Any, max_prompt_length: int):
        self.tokenizer, self.max_prompt_length = tokenizer, max_prompt_length
        # Whether the tokenizer puts a BOS before a text of its own accord (its post-processor, or a
        # slow tokenizer's add_bos_token): plain-string prompts get it, as TRL's do.
        bos = tokenizer.bos_token_id
        self.bos_token_id = bos
        self.adds_bos = (
            bos is not None
            and tokenizer("a")["input_ids"][:1] == [bos]
            and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]
        )

    def text(self, prompt: str | list[dict]) -> str:
        return prompt_text(self.tokenizer, prompt)

    def ids(self, prompt: str | list[dict], text: str) -> list[int]:
        """``text``'s token ids, BOS as the tokenizer adds it: a plain string gets the tokenizer's
        BOS (as TRL's prompts do); a chat template's text carries its own BOS where the template
        writes one, and never gets a second."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        templated = not isinstance(prompt, str) and bool(self.tokenizer.chat_template)
        if self.adds_bos and not templated and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def truncated(self, ids: list[int]) -> list[int]:
        """At most max_prompt_length tokens, cut from the left as TRL does: the end of the prompt
        (the question, a chat template's generation header) stays; a leading BOS stays too."""
        limit = self.max_prompt_length
        if len(ids) <= limit:
            return ids
        if limit > 1 and self.bos_token_id is not None and ids[0] == self.bos_token_id:
            return [ids[0], *ids[len(ids) - (limit - 1) :]]
        return ids[len(ids) - limit :]


def check_a_prompt_fits(prompts: PromptFormatter, rows: Iterable[dict]) -> None:
    """ConfigError naming max_prompt_length when every prompt of the dataset is longer, counted as
    the model gets it (chat template and BOS included): each would be cut from the left, and the run
    would train on nothing but prompts whose beginning is gone. Reads rows up to the first that fits
    (one, in a usual dataset); prompts cut now and then are counted and named in steps instead.
    First, ``check_no_empty_prompt``: a prompt of no token at all is refused, naming its line."""
    check_no_empty_prompt(prompts, rows)
    limit = prompts.max_prompt_length
    shortest = None
    for row in rows:
        prompt = row["prompt"]
        length = len(prompts.ids(prompt, prompts.text(prompt)))
        if length <= limit:
            return
        shortest = length if shortest is None else min(shortest, length)
    raise ConfigError(
        "hyperparameters.max_prompt_length",
        (
            f"every prompt of the dataset is longer than max_prompt_length ({limit} tokens): the shortest is "
            f"{shortest} tokens, chat template and BOS included, so every prompt would lose its beginning. "
            f"Raise max_prompt_length to at least {shortest}, or shorten the prompts"
        ),
    )


def check_no_empty_prompt(prompts: PromptFormatter, rows: Iterable[dict], dataset: str = "dataset") -> None:
    """DatasetError naming the line (of ``dataset``) of the first prompt that is no token at all as
    the model gets it: with a tokenizer that adds no BOS, and whose normalizer removes the whole text
    (zero-width or control characters), nothing would predict a completion's first token.

    Every row is read, few are tokenized: a prompt that gets the tokenizer's BOS
    (``PromptFormatter.ids``) is never empty, nor is a text with a character that is a token by
    itself (a tokenizer drops characters, not a character for its neighbours), each character
    tokenized once. Only a prompt made of characters that are no token alone is tokenized whole."""
    tokenizer = prompts.tokenizer
    kept: set[str] = set()  # characters that are a token (or more) by themselves
    dropped: set[str] = set()  # characters that are none

    def visible(text: str) -> bool:
        chars = set(text)
        if chars.isdisjoint(kept):
            for char in chars - dropped:
                (kept if tokenizer(char, add_special_tokens=False)["input_ids"] else dropped).add(char)
        return not chars.isdisjoint(kept)

    for index, row in enumerate(rows):
        prompt = row["prompt"]
        if isinstance(prompt, str) and (prompts.adds_bos or visible(prompt)):
            continue
        # chat messages: their contents a line each, as a tokenizer without a chat template gets them
        # (a template writes them too, among its own text)
        if not isinstance(prompt, str) and visible(messages_text(prompt)):
            continue
        text = prompts.text(prompt)
        if prompts.ids(prompt, text):
            continue
        raise DatasetError(
            f"the {dataset}'s prompt {text[:40]!r} is zero tokens for this model's tokenizer (which "
            "removes every character, and adds no BOS): the model would have nothing to predict the "
            "completion's first token from. Give the prompt visible text, or remove the row",
            rows.line_number(index) if isinstance(rows, RowFile) else index + 1,
        )


def truncated_prompts(batch: ScoredGroups) -> list[int]:
    """The groups whose prompt max_prompt_length cut (none known: a batch built without lengths)."""
    if not batch.prompt_lengths:
        return []
    return [
        b
        for b, (full, kept) in enumerate(zip(batch.prompt_lengths, batch.prompt_ids, strict=True))
        if full > kept.shape[0]
    ]


def warn_truncated_prompts(
    step: int,
    batch: ScoredGroups,
    rows: Sequence[dict],
    max_prompt_length: int,
    progress: Progress,
    warned: set[int],
) -> set[int]:
    """A warning event for each prompt cut to max_prompt_length, once per row and at most
    MAX_TRUNCATION_WARNINGS per run; the ``prompts_truncated`` metric counts every one."""
    for b in truncated_prompts(batch):
        row = batch.row_indices[b]
        if row in warned or len(warned) >= MAX_TRUNCATION_WARNINGS:
            continue
        warned.add(row)
        line = rows.line_number(row) if isinstance(rows, RowFile) else row + 1
        full, kept = batch.prompt_lengths[b], batch.prompt_ids[b].shape[0]
        more = "" if len(warned) < MAX_TRUNCATION_WARNINGS else "; further cut prompts are only counted"
        progress.on_log(
            "warning",
            (
                f"step {step}: the prompt on dataset line {line} is {full} tokens, more than "
                f"max_prompt_length {max_prompt_length}: its first {full - kept} tokens were cut "
                "(left truncation, as TRL: the end of the prompt and a leading BOS stay, so the model may "
                "start mid-text). The metric prompts_truncated counts every cut "
                f"prompt{more}. Raise max_prompt_length or shorten the prompt"
            ),
        )
    return warned
