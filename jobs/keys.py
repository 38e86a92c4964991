"""API keys: issued by ``grpo keys create``, sent as ``Authorization: Bearer grpo_…``.

A key is 256 random bits behind a recognisable prefix (``grpo_``, so secret scanners and people
can tell what leaked). Only its SHA-256 is stored: a slow password hash buys nothing against a
secret that cannot be guessed, and a plain digest lets a request find its key with one indexed
lookup.
"""

from __future__ import annotations

import hashlib
import secrets
import unicodedata

from sqlalchemy.orm import Session

from jobs.errors import InvalidRequest, Unauthenticated
from jobs.models import ApiKey
from jobs.queries.keys import create_api_key, get_api_key_by_hash

TOKEN_PREFIX = "grpo_"
LOCAL_OWNER = "local"  # the one owner of a server whose authentication is disabled
HOW_TO_GET_ONE = "send 'Authorization: Bearer <key>'; an operator creates keys with `grpo keys create NAME`"
MAX_LABEL_CHARS = 255  # api_keys.name and .owner are VARCHAR(255)
# Characters that make a name print as something else in `grpo keys list` and in logs: controls
# (a newline forges a row, ESC sequences restyle or erase the terminal, NUL cannot be stored), line
# and paragraph separators, lone surrogates (not Unicode: nothing can encode them), and the bidi
# embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069), which reorder what follows.
_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_BIDI_CONTROLS = frozenset(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))


def check_label(value: str, *, param: str) -> str:
    """A key's name or owner (``param`` says which), stripped; ``InvalidRequest`` naming ``param``
    when it is empty, longer than MAX_LABEL_CHARS, or holds a character that would print as
    something else."""
    label = value.strip()
    if not 0 < len(label) <= MAX_LABEL_CHARS:
        raise InvalidRequest(
            f"must be 1 to {MAX_LABEL_CHARS} characters (not counting surrounding spaces); got {len(label)}",
            param=param,
        )
    for position, char in enumerate(label, start=1):
        if _prints_as_something_else(char):
            category = unicodedata.category(char)
            name = unicodedata.name(char, "a lone surrogate" if category == "Cs" else "a control character")
            raise InvalidRequest(
                f"contains U+{ord(char):04X} ({name}) at character {position}, which would print as "
                "something else in `grpo keys list` and in logs; use printable characters only",
                param=param,
            )
    return label


def _prints_as_something_else(char: str) -> bool:
    return unicodedata.category(char) in _UNPRINTABLE_CATEGORIES or char in _BIDI_CONTROLS


def shown_label(value: str) -> str:
    """A key's name or owner as a terminal may print it: each character ``check_label`` refuses
    written as ``\\uXXXX`` (a key stored before that check may hold some)."""
    return "".join(f"\\u{ord(char):04x}" if _prints_as_something_else(char) else char for char in value)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_key(*, session: Session, name: str, owner: str | None = None) -> tuple[ApiKey, str]:
    """A new key for ``owner`` (by default, a new owner called ``name``) and its secret, which is
    not stored anywhere: show it once. Both are stripped; ``InvalidRequest`` naming ``name`` or
    ``owner`` for one that cannot be shown as it is (``check_label``)."""
    name = check_label(name, param="name")
    owner = check_label(owner, param="owner") if owner is not None else name
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = create_api_key(
        session=session, name=name, owner=owner, token_hash=hash_token(token), prefix=token[:12]
    )
    return key, token


def authenticate(*, session: Session, token: str) -> ApiKey:
    """The live key whose secret is ``token``; raises ``Unauthenticated``."""
    key = get_api_key_by_hash(session=session, token_hash=hash_token(token))
    if key is None:
        raise Unauthenticated(f"invalid API key; {HOW_TO_GET_ONE}")
    if key.revoked_at is not None:
        raise Unauthenticated(f"this API key ({key.prefix}…) was revoked; {HOW_TO_GET_ONE}")
    return key
