"""API keys: looked up by the hash of their secret, listed and revoked from the command line."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.errors import ApiKeyNotFound
from jobs.models import ApiKey, new_id, utcnow


def create_api_key(*, session: Session, name: str, owner: str, token_hash: str, prefix: str) -> ApiKey:
    key = ApiKey(id=new_id("key"), name=name, owner=owner, token_hash=token_hash, prefix=prefix)
    session.add(key)
    session.flush()
    return key


def get_api_key_by_hash(*, session: Session, token_hash: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.token_hash == token_hash))


def list_api_keys(*, session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_api_key(*, session: Session, key_id: str) -> ApiKey:
    """Revoke a key (at once: every request looks its key up); revoking it again changes nothing."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise ApiKeyNotFound(key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key
