"""Text the database can store. PostgreSQL's ``text`` and ``jsonb`` refuse the NUL character
(``\\u0000``), and no column can hold a lone surrogate (``\\ud800``: JSON can escape one, UTF-8
cannot encode it). Both reach us in JSON strings.

What a user sends is refused with a 4xx naming the field: ``StorableStr`` for a string field of a
request body, ``Annotated[..., STORABLE]`` for a compound one (reward specs, hyperparameters,
metadata), ``unstorable_reason``/``find_unstorable`` for text checked outside a request model (an
uploaded file's name and rows, a URL's parameters). What the service writes itself (samples,
events, failure reasons: a model's or a grader's output) goes through ``storable_text``, which
replaces each such character with U+FFFD.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from jobs.errors import InvalidRequest

UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"
UNSTORABLE_ERROR = "unstorable_text"  # the pydantic error type; ctx["at"] is the path inside the field


def unstorable_reason(text: str) -> str | None:
    """Why ``text`` cannot be stored, as advice to its sender; None when it can."""
    found = UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains a NUL character (\\u0000), which cannot be stored; remove it"
    return (
        f"contains a lone UTF-16 surrogate (\\u{ord(found.group()):04x}), which is not valid Unicode; "
        "send the character itself, or both halves of its surrogate pair"
    )


def find_unstorable(value: Any) -> tuple[tuple[str | int, ...], str] | None:
    """The path to the first string in ``value`` (a JSON value: dicts, lists, scalars) that cannot
    be stored, and why; a bad dict key is reported at its dict's path. None when all can be."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:  # iterative: a deeply nested value must not exhaust the recursion limit
        path, item = stack.pop()
        if isinstance(item, str):
            reason = unstorable_reason(item)
            if reason is not None:
                return path, reason
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                reason = unstorable_reason(key) if isinstance(key, str) else None
                if reason is not None:
                    return path, f"has a key that {reason}"
                stack.append(((*path, key), child))
        elif isinstance(item, list | tuple):
            stack.extend(((*path, index), child) for index, child in reversed(list(enumerate(item))))
    return None


def check_file_name(filename: str | None) -> None:
    """``InvalidRequest`` unless an uploaded file's name (multipart ``file``) can be stored."""
    reason = None if filename is None else unstorable_reason(filename)
    if reason is not None:
        raise InvalidRequest(f"the file's name {reason}", param="file")


def _storable_value(value: Any) -> Any:
    found = find_unstorable(value)
    if found is not None:
        path, reason = found
        raise PydanticCustomError(UNSTORABLE_ERROR, reason, {"at": path})
    return value


# Marks a request body's field whose strings (keys included) the database must be able to store:
# ``Annotated[dict[str, Any], STORABLE]``. An error inside a compound field names the place:
# api/errors.py appends ``ctx["at"]`` to the field's location.
STORABLE = AfterValidator(_storable_value)
StorableStr = Annotated[str, STORABLE]


def storable_text(text: str) -> str:
    """``text`` with each character the database cannot store replaced by U+FFFD."""
    return text if UNSTORABLE.search(text) is None else UNSTORABLE.sub(REPLACEMENT, text)
