"""Idempotency-Keys: what a (owner, endpoint, key) made, for a day.

A retry with the same key and the same request gets the resource made the first time; the same
key with another request is an error. Keys are per owner (two owners may pick the same one) and
per endpoint, and expire after ``ttl_s``, after which the key may be used afresh.
"""

from __future__ import annotations

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.errors import IdempotencyKeyInUse, IdempotencyKeyReused
from jobs.models import IdempotencyKey, since


def find_idempotent_resource(
    *, session: Session, owner: str, endpoint: str, key: str, request_hash: str, ttl_s: float
) -> str | None:
    """The id of the resource made with this key, or None if the key is new (or expired).

    Raises ``IdempotencyKeyReused`` if the key was used with another request.
    """
    earlier = session.get(IdempotencyKey, (owner, endpoint, key))
    if earlier is None:
        return None
    if earlier.created_at < since(ttl_s):
        session.delete(earlier)
        session.flush()
        return None
    if earlier.request_hash != request_hash:
        raise IdempotencyKeyReused()
    return earlier.resource_id


def remember_idempotency_key(
    *,
    session: Session,
    owner: str,
    endpoint: str,
    key: str,
    request_hash: str,
    resource_id: str,
    ttl_s: float,
) -> None:
    """Record what the key made (and forget the owner's expired keys, so the table stays small).

    Two requests with one key racing each other: the second waits on the first's row and, once
    that commits, gets an ``IdempotencyKeyInUse`` (a 409 with ``Retry-After``); its retry then
    finds the first's resource.
    """
    session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.owner == owner, IdempotencyKey.created_at < since(ttl_s))
    )
    session.add(
        IdempotencyKey(
            owner=owner, endpoint=endpoint, key=key, request_hash=request_hash, resource_id=resource_id
        )
    )
    try:
        session.flush()
    except IntegrityError:
        raise IdempotencyKeyInUse() from None
