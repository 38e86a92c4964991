"""Datasets: JSONL rows with a ``prompt`` (a string or a list of chat messages) and whatever
fields the rewards read. Standard library only: the service validates uploads with it."""

from __future__ import annotations

import json
import random
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

from trainer.errors import DatasetError


def check_row(row: Any, line: int | None = None) -> dict[str, Any]:
    """Return ``row`` if it can be trained on, else raise ``DatasetError`` naming the line. A row
    in the chat format (``messages`` and no ``prompt``) comes back with its prompt: see ``chat_row``."""
    if not isinstance(row, dict):
        raise DatasetError(f"expected a JSON object, got {type(row).__name__}", line)
    if "prompt" not in row and "messages" in row:
        row = chat_row(row, line)
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DatasetError("'prompt' is empty", line)
    elif isinstance(prompt, list) and prompt:
        for i, message in enumerate(prompt):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise DatasetError(f'\'prompt\'[{i}] must be a message {{"role": ..., "content": ...}}', line)
    elif prompt is None:
        raise DatasetError(
            "missing 'prompt' (a string, or a list of chat messages); a chat-format row may give "
            "'messages' instead, the prompt being every message before a final assistant one",
            line,
        )
    else:
        raise DatasetError("'prompt' must be a non-empty string or a non-empty list of chat messages", line)
    return row


def chat_row(row: dict[str, Any], line: int | None = None) -> dict[str, Any]:
    """A chat-format row (``{"messages": [{"role", "content"}, ...], ...}``, as OpenAI's and most
    chat datasets have it) with its ``prompt``: the messages up to a final ``assistant`` one, whose
    content (the reference reply) becomes the field ``completion`` unless the row has one. The row
    keeps ``messages`` and every other field for the rewards. ``developer`` messages become
    ``system`` ones and a content list of text parts is joined, as OpenAI's formats allow."""
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError(
            "missing 'prompt' (a string, or a list of chat messages); this row's 'messages' must be "
            'a non-empty list of chat messages {"role": ..., "content": ...} to be read as one',
            line,
        )
    prompt = [chat_message(message) for message in messages]
    extra: dict[str, Any] = {}
    if len(prompt) > 1 and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        reply = prompt.pop()
        if "completion" not in row and isinstance(reply.get("content"), str):
            extra["completion"] = reply["content"]
    return {"prompt": prompt, **row, **extra}


def chat_message(message: Any) -> Any:
    """One chat message as the trainer's chat templates take it (what cannot be read is left for
    ``check_row`` to name)."""
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, list) and all(
        isinstance(part, dict)
        and isinstance(part.get("text"), str)
        and part.get("type") in ("text", "input_text")
        for part in content
    ):
        content = "".join(part["text"] for part in content)
    role = "system" if message.get("role") == "developer" else message.get("role")
    return {**message, "role": role, "content": content}


def messages_text(messages: Iterable[Any]) -> str:
    """A chat prompt as text without a chat template (a tokenizer that has none, or the API, which
    has no tokenizer): the messages' contents, a line each."""
    return "\n".join(str(message.get("content", "")) for message in messages if isinstance(message, dict))


def parse_line(text: str, number: int | None) -> dict[str, Any] | None:
    """One JSONL line as a checked row; None for a blank line; ``DatasetError`` for a bad one."""
    if not text.strip():
        return None
    return check_row(parse_json(text, number), number)


def parse_json(text: str, number: int | None) -> Any:
    """``json.loads``, every failure a ``DatasetError`` naming the line and the column (in
    characters, as an editor counts them). A UTF-8 byte order mark before the JSON is skipped (some
    editors start a file with one)."""
    text = text.removeprefix("\ufeff")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # exc.colno counts from the last newline before the error, and the text ends with the
        # line's own: a line cut short was blamed on "column 1" (of the empty line after it).
        end = len(text.rstrip("\r\n"))
        where = f"column {exc.pos + 1}" if exc.pos < end else f"the end of the line, column {end + 1}"
        raise DatasetError(f"not valid JSON ({exc.msg} at {where})", number) from None
    except RecursionError:
        raise DatasetError("not valid JSON: nested too deeply to read", number) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise DatasetError(f"not valid JSON ({exc})", number) from None


# A JSON string, escapes and all; one never left open (an unterminated string runs to the end of
# the line), so that a match started at a quote always succeeds and the scan stays linear.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_INNERMOST_PAIR = re.compile(rb"\[\]|\{\}")


def json_over_limits(line: bytes, *, max_depth: int, max_values: int) -> Literal["depth", "values"] | None:
    """Whether a JSON text nests deeper than ``max_depth`` or holds more than ``max_values`` values
    (containers and scalars), read off its raw bytes without building anything: ``json.loads`` of
    ``[],[],…`` takes ~25 times the text's size, and of deep nesting, the stack. Linear time, and
    memory within twice the line's. Says "values" first when both are over; None when neither.

    Every value but a container's first follows a comma, so commas + opening brackets + 1,
    outside strings, bound the values. The depth is the number of rounds of deleting innermost
    ``[]``/``{}`` pairs (one level a round) that empty the brackets. Brackets that do not balance
    stop the count early: that text is not JSON, and the parser says where (nested too deep for
    it, a ``RecursionError``, which ``parse_line`` reports).
    """
    openings = line.count(b"[") + line.count(b"{")
    if line.count(b",") + openings + 1 <= max_values and openings <= max_depth:
        return None  # even counting the brackets and commas inside strings
    # Each string opens with a quote no backslash precedes, and a row within the limit has at
    # most 2 * max_values strings (values and keys): more such quotes, and emptying the strings
    # below could take as many regex matches as the line has bytes.
    if line.count(b'"') - line.count(b'\\"') > 4 * max_values + 4:
        return "values"
    bare = _JSON_STRING.sub(b'""', line)  # [n] bytes: the text, strings emptied
    if bare.count(b",") + bare.count(b"[") + bare.count(b"{") + 1 > max_values:
        return "values"
    brackets = _NOT_BRACKET.sub(b"", bare)  # at most 2 * max_values bytes
    for _ in range(max_depth):
        brackets, removed = _INNERMOST_PAIR.subn(b"", brackets)
        if not brackets or not removed:
            return None
    return "depth" if brackets and _INNERMOST_PAIR.search(brackets) else None


def parse_rows(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Parse JSONL text lines (blank lines skipped); the first bad line raises ``DatasetError``."""
    rows = []
    for number, text in enumerate(lines, start=1):
        row = parse_line(text, number)
        if row is not None:
            rows.append(row)
    if not rows:
        raise DatasetError("the dataset has no rows")
    return rows


class RowFile(Sequence[dict[str, Any]]):
    """A JSONL dataset read on demand: each row is parsed again when asked for, from the byte
    offset of its line, so memory holds 8 bytes a row rather than the rows. Opening it reads
    every line once and checks it (the first bad line raises ``DatasetError``); so does
    ``required``, fields every row must have. Lines end at ``\\n``, as the upload check splits
    them. Not for several threads at once."""

    def __init__(self, path: str | Path, *, required: Iterable[str] = ()):
        self.path = Path(path)
        self._file: BinaryIO | None = None  # opened on the first row read
        if not self.path.is_file():
            raise DatasetError(f"dataset file {str(self.path)!r} does not exist")
        required = sorted(required)
        self._offsets = array("q")  # [rows] where each row's line starts
        offset = 0
        with self.path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                row = _decode_line(line, number)
                if row is not None:
                    missing = next((name for name in required if name not in row), None)
                    if missing is not None:
                        raise DatasetError(
                            f"the rewards need the field {missing!r}, which this row lacks", number
                        )
                    self._offsets.append(offset)
                offset += len(line)
        if not self._offsets:
            raise DatasetError("the dataset has no rows")

    def __len__(self) -> int:
        return len(self._offsets)

    def line_number(self, index: int) -> int:
        """The 1-based line of row ``index`` in the file (blank lines hold no row), for messages."""
        with self.path.open("rb") as lines:
            return lines.read(self._offsets[index]).count(b"\n") + 1

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]  # no slices
        if self._file is None:
            self._file = self.path.open("rb")
        self._file.seek(self._offsets[index])
        row = _decode_line(self._file.readline(), None)
        assert row is not None
        return row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with self.path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                row = _decode_line(line, number)
                if row is not None:
                    yield row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self) -> None:
        self.close()


def _decode_line(line: bytes, number: int | None) -> dict[str, Any] | None:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise DatasetError("not UTF-8 text", number) from None
    return parse_line(text, number)


class PromptSampler:
    """Draws prompts without replacement, reshuffling each epoch; its state resumes exactly."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(self.num_rows))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def draw(self, count: int) -> list[int]:
        indices = []
        while len(indices) < count:
            if self.position == self.num_rows:
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            indices.append(self._order[self.position])
            self.position += 1
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)
