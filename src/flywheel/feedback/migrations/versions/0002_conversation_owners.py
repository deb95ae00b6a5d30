"""Conversation owners that no one else can take: anonymous clients are stored as `client:` + a hash of their id
(the id is a secret), and API calls with no identity as `api:unidentified` (readable by admins only).

Before, a browser's id was stored as `anon:<id>` and every API call without a user token as `anonymous`, which any
caller without an identity could list. Ids shorter than 22 characters (too short to be unguessable) are moved to
`api:unidentified` too: their browsers get a new id.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import hashlib
import re

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UNIDENTIFIED = "api:unidentified"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_-]{22,128}$")
conversations = sa.table("conversations", sa.column("id", sa.Integer), sa.column("owner", sa.String))


def _owner(old: str) -> str:
    if old == "anonymous":
        return UNIDENTIFIED
    client = old.removeprefix("anon:")
    if not _CLIENT_ID.match(client):
        return UNIDENTIFIED
    return "client:" + hashlib.sha256(client.encode()).hexdigest()[:40]


def upgrade() -> None:
    conn = op.get_bind()
    legacy = sa.or_(conversations.c.owner == "anonymous", conversations.c.owner.like("anon:%"))
    owners = conn.execute(sa.select(conversations.c.owner).where(legacy).distinct()).scalars().all()
    for old in owners:
        conn.execute(conversations.update().where(conversations.c.owner == old).values(owner=_owner(old)))


def downgrade() -> None:
    # The hashes cannot be undone: the conversations stay with their (now unreadable) owners.
    pass
