"""Skipped tasks: `task_skips` records a task a labeler chose not to label (with an optional reason), so that
`/api/label/next` offers them the next one instead. One row per labeler and task.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "task_skips",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("labeler_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["labeler_id"], ["users.id"]),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("task_id", "labeler_id", name="uq_task_skips_task_labeler"),
    )
    with op.batch_alter_table("task_skips", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_task_skips_labeler_id"), ["labeler_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_task_skips_task_id"), ["task_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("task_skips", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_task_skips_task_id"))
        batch_op.drop_index(batch_op.f("ix_task_skips_labeler_id"))
    op.drop_table("task_skips")
