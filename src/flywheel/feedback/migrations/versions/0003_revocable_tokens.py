"""Revocable tokens: `users.token_hash` may be NULL (a revoked token; `flywheel db rotate-token` issues a new one).
The `user` role (chat only) needs no schema change: roles are strings.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.alter_column("token_hash", existing_type=sa.String(length=64), nullable=True)


def downgrade() -> None:
    # A revoked user gets an unusable placeholder (no token hashes to it) so the column can be NOT NULL again.
    op.execute("UPDATE users SET token_hash = 'revoked-' || CAST(id AS VARCHAR(20)) WHERE token_hash IS NULL")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.alter_column("token_hash", existing_type=sa.String(length=64), nullable=False)
