"""API keys: issued by ``grpo keys create``, sent as ``Authorization: Bearer grpo_…``.

A key is 256 random bits behind a recognisable prefix (``grpo_``, so secret scanners and people
can tell what leaked). Only its SHA-256 is stored: a slow password hash buys nothing against a
secret that cannot be guessed, and a plain digest lets a request find its key with one indexed
lookup.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy.orm import Session

from jobs.errors import Unauthenticated
from jobs.models import ApiKey
from jobs.queries.keys import create_api_key, get_api_key_by_hash

TOKEN_PREFIX = "grpo_"
LOCAL_OWNER = "local"  # the one owner of a server whose authentication is disabled
HOW_TO_GET_ONE = "send 'Authorization: Bearer <key>'; an operator creates keys with `grpo keys create NAME`"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_key(*, session: Session, name: str, owner: str | None = None) -> tuple[ApiKey, str]:
    """A new key for ``owner`` (by default, a new owner called ``name``) and its secret, which is
    not stored anywhere: show it once."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = create_api_key(
        session=session, name=name, owner=owner or name, token_hash=hash_token(token), prefix=token[:12]
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
