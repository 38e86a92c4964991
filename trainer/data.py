"""Datasets: JSONL rows with a ``prompt`` (a string or a list of chat messages) and whatever
fields the rewards read. Standard library only: the service validates uploads with it."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

from trainer.errors import DatasetError

# The roles a chat message may have, as chat templates know them (``developer``, OpenAI's name for
# ``system``, is read as ``system``: ``chat_message``).
ROLES = ("system", "user", "assistant", "tool")

log = logging.getLogger(__name__)


def check_row(row: Any, line: int | None = None, *, uploading: bool = False) -> dict[str, Any]:
    """Return ``row`` if it can be trained on, else raise ``DatasetError`` naming the line. A row
    in the chat format (``messages`` and no ``prompt``) comes back with its prompt: see ``chat_row``;
    a prompt of chat messages comes back as ``chat_message`` reads each one. A row with both trains
    on its ``prompt``. ``uploading`` (the service's check of a new upload) refuses such a row
    unless its ``messages`` give its ``prompt`` (``same_prompt``): one of the two would be ignored
    without a word (a null ``messages`` is no chat, and ignoring it loses nothing). Only then: a
    dataset uploaded before that rule, read again when a job starts, trains as it did."""
    if not isinstance(row, dict):
        raise DatasetError(f"expected a JSON object, got {type(row).__name__}", line)
    if uploading and "prompt" in row and row.get("messages") is not None and not same_prompt(row):
        raise DatasetError(
            "'prompt' and 'messages' are both given, and give different prompts (a string prompt is "
            "the same as messages holding one user message with that content, before a final "
            "assistant one); keep one: 'prompt' (a string, or a list of chat messages) or 'messages' "
            "(a chat, the prompt being every message before a final assistant one), or rename the "
            "other (e.g. 'reference_messages')",
            line,
        )
    source = "prompt"  # the field the prompt's messages were written in
    if "prompt" not in row and "messages" in row:
        row, source = chat_row(row, line), "messages"
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DatasetError("'prompt' is empty", line)
    elif isinstance(prompt, list) and prompt:
        prompt = [chat_message(message) for message in prompt]
        for i, message in enumerate(prompt):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise DatasetError(f'{source!r}[{i}] must be a message {{"role": ..., "content": ...}}', line)
            if message["role"] not in ROLES:
                raise DatasetError(
                    f"{source!r}[{i}] has the role {message['role']!r}; a message's role is one of "
                    f"{', '.join(ROLES)} (or developer, read as system)",
                    line,
                )
        row = {**row, "prompt": prompt}
    elif prompt is None:
        raise DatasetError(
            "missing 'prompt' (a string, or a list of chat messages); a chat-format row may give "
            "'messages' instead, the prompt being every message before a final assistant one",
            line,
        )
    else:
        raise DatasetError("'prompt' must be a non-empty string or a non-empty list of chat messages", line)
    return row


def same_prompt(row: dict[str, Any]) -> bool:
    """Whether ``row``'s ``messages``, read as a chat row (``chat_row``: the messages before a
    final assistant one), give its ``prompt``: a list of the same messages (each as
    ``chat_message`` reads it), or a string that is the content of their only message, a user's
    (``{"prompt": "What is 2+2?", "messages": [{"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"}]}``)."""
    prompt = row["prompt"]
    try:
        derived = chat_row({key: value for key, value in row.items() if key != "prompt"})["prompt"]
    except DatasetError:
        return False
    if isinstance(prompt, str):
        return (
            len(derived) == 1
            and isinstance(derived[0], dict)
            and derived[0].get("role") == "user"
            and derived[0].get("content") == prompt
        )
    if not isinstance(prompt, list):
        return False
    return derived == [chat_message(message) for message in prompt]


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
    if isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        if len(prompt) == 1:
            raise DatasetError(
                "'messages' holds only an assistant message, and the prompt is the messages before "
                "a final assistant one: this row has none; put the user message it answers before it",
                line,
            )
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


def is_blank(text: str) -> bool:
    """A line with nothing but white space (after a UTF-8 byte order mark, which a file's first
    line may start with)."""
    return not text.removeprefix("\ufeff").strip()


def parse_line(text: str, number: int | None, *, uploading: bool = False) -> dict[str, Any] | None:
    """One JSONL line as a checked row; None for a blank line; ``DatasetError`` for a bad one.
    ``uploading``: the service's check of a new upload, which refuses more (``check_row``)."""
    if is_blank(text):
        return None
    return check_row(parse_json(text, number), number, uploading=uploading)


class _NotJSONNumber:
    """What the parser makes, in place of a value, of a number that is not standard JSON or that
    this side cannot read: ``NaN``/``Infinity`` (Python's extension), one beyond a float's range
    (``1e400`` would be infinity), an integer longer than ``sys.get_int_max_str_digits()``."""

    def __init__(self, text: str, found: list[_NotJSONNumber]):
        self.text = text
        found.append(self)

    def problem(self) -> str:
        if self.text in ("NaN", "Infinity", "-Infinity"):
            return f"is {self.text}, which JSON does not allow; write null or a string instead"
        shown = self.text if len(self.text) <= 24 else f"{self.text[:12]}…{self.text[-8:]}"
        if any(c in self.text for c in ".eE"):
            return f"is {shown}, beyond a 64-bit float's range (it reads as infinity); write it as a string"
        digits = len(self.text.lstrip("-"))
        return (
            f"is an integer of {digits} digits, more than the {sys.get_int_max_str_digits()} a number "
            "may have here; write it as a string"
        )


def json_field_path(path: tuple[str | int, ...]) -> str:
    """``'messages'[0]['content']``: where a value sits in a row, as the messages name fields."""
    if not path:
        return "the row"
    return "".join(f"[{part!r}]" if i or isinstance(part, int) else repr(part) for i, part in enumerate(path))


def _find_not_json_number(value: Any) -> tuple[tuple[str | int, ...], _NotJSONNumber] | None:
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:  # iterative: as deep as the parser went
        path, item = stack.pop()
        if isinstance(item, _NotJSONNumber):
            return path, item
        if isinstance(item, dict):
            stack.extend(((*path, key), child) for key, child in reversed(list(item.items())))
        elif isinstance(item, list):
            stack.extend(((*path, index), child) for index, child in reversed(list(enumerate(item))))
    return None


def _loads_standard(text: str, *, read_ints: bool) -> Any:
    """``json.loads`` of standard JSON numbers only: the others (``_NotJSONNumber``) are a
    ``DatasetError`` naming the field. ``read_ints=False`` leaves integers to Python's own
    parser, which raises ``ValueError`` for one too long to read."""
    found: list[_NotJSONNumber] = []

    def finite(number: str) -> float | _NotJSONNumber:
        value = float(number)
        return value if math.isfinite(value) else _NotJSONNumber(number, found)

    def readable(number: str) -> int | _NotJSONNumber:
        limit = sys.get_int_max_str_digits()
        return _NotJSONNumber(number, found) if limit and len(number.lstrip("-")) > limit else int(number)

    value = json.loads(
        text,
        parse_constant=lambda name: _NotJSONNumber(name, found),
        parse_float=finite,
        parse_int=readable if read_ints else None,
    )
    if found:
        where = _find_not_json_number(value)
        if where is None:  # under a key given twice: gone from the value, not from the line
            raise DatasetError(f"a value {found[0].problem()}")
        raise DatasetError(f"{json_field_path(where[0])} {where[1].problem()}")
    return value


def parse_json(text: str, number: int | None) -> Any:
    """``json.loads``, every failure a ``DatasetError`` naming the line and the column (in
    characters, as an editor counts them), or the field of a number JSON does not allow (``NaN``,
    ``Infinity``, one a float cannot hold) or this parser cannot read (an integer of more than
    ``sys.get_int_max_str_digits()`` digits): a row must read back as the JSON it is stored as. A
    UTF-8 byte order mark before the JSON is skipped (some editors start a file with one)."""
    text = text.removeprefix("\ufeff")
    try:
        try:
            return _loads_standard(text, read_ints=False)
        except ValueError as exc:
            if isinstance(exc, json.JSONDecodeError | DatasetError):
                raise
            # an integer too long for int(): parsed again, each integer checked, to name its field
            return _loads_standard(text, read_ints=True)
    except DatasetError as exc:
        raise DatasetError(exc.reason, number) from None
    except json.JSONDecodeError as exc:
        # exc.colno counts from the last newline before the error, and the text ends with the
        # line's own: a line cut short was blamed on "column 1" (of the empty line after it).
        end = len(text.rstrip("\r\n"))
        where = f"column {exc.pos + 1}" if exc.pos < end else f"the end of the line, column {end + 1}"
        raise DatasetError(f"not valid JSON ({exc.msg} at {where})", number) from None
    except RecursionError:
        raise DatasetError("not valid JSON: nested too deeply to read", number) from None


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
    ``required``, fields every row must have; rows whose ``prompt`` and ``messages`` differ (an
    upload refuses them since; one stored before trains on its ``prompt``) are logged, once a file.
    Lines end at ``\\n``, as the upload check splits them. Not for several threads at once."""

    def __init__(self, path: str | Path, *, required: Iterable[str] = ()):
        self.path = Path(path)
        self._file: BinaryIO | None = None  # opened on the first row read
        if not self.path.is_file():
            raise DatasetError(f"dataset file {str(self.path)!r} does not exist")
        required = sorted(required)
        self._offsets = array("q")  # [rows] where each row's line starts
        offset = 0
        conflicting, first_conflict = 0, 0  # rows whose prompt and messages differ, the first's line
        with self.path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                row = _decode_line(line, number)
                if row is not None:
                    missing = next((name for name in required if name not in row), None)
                    if missing is not None:
                        raise DatasetError(
                            f"the rewards need the field {missing!r}, which this row lacks", number
                        )
                    if row.get("messages") is not None and "prompt" in row and not same_prompt(row):
                        conflicting += 1
                        first_conflict = first_conflict or number
                    self._offsets.append(offset)
                offset += len(line)
        if not self._offsets:
            raise DatasetError("the dataset has no rows")
        if conflicting:
            log.warning(
                "%s: %d row(s) (line %d first) give both 'prompt' and 'messages', with different "
                "prompts: they train on 'prompt' (an upload would refuse them now)",
                self.path.name,
                conflicting,
                first_conflict,
            )

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
