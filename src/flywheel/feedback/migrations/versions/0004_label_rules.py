"""The data rules in the schema: at most `labels_needed` labels per task, one demonstration per labeler and task, one
vote per voter and message.

- `rankings.slot` / `demonstrations.slot`: which of the task's labels a row is (0..labels_needed-1), unique per task,
  so concurrent submissions can never give a task more labels than it needs (the server hands out the next free
  slot; a race loses on the constraint and is told the task is complete). Existing rows are numbered by id.
- `uq_demonstrations_task_labeler`: a labeler's second and later demonstrations of one task (possible before) keep
  their text but lose the task link (they become free-form demonstrations, which the export still uses).
- `uq_votes_message_voter`: of several votes of one voter on one message, the latest stays (a second vote replaces
  the first).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

rankings = sa.table("rankings", sa.column("id", sa.Integer), sa.column("task_id", sa.Integer), sa.column("slot"))
demonstrations = sa.table(
    "demonstrations",
    sa.column("id", sa.Integer),
    sa.column("task_id", sa.Integer),
    sa.column("labeler_id", sa.Integer),
    sa.column("slot"),
)
votes = sa.table("votes", sa.column("id", sa.Integer), sa.column("message_id", sa.Integer), sa.column("voter"))


def _number_by_task(conn: sa.Connection, table: sa.TableClause) -> None:
    """slot = the row's rank by id among its task's rows."""
    rows = conn.execute(
        sa.select(table.c.id, table.c.task_id).where(table.c.task_id.is_not(None)).order_by(table.c.id)
    ).all()
    seen: dict[int, int] = {}
    for row_id, task_id in rows:
        conn.execute(table.update().where(table.c.id == row_id).values(slot=seen.get(task_id, 0)))
        seen[task_id] = seen.get(task_id, 0) + 1


def upgrade() -> None:
    conn = op.get_bind()
    # a labeler's extra demonstrations of one task become free-form (the first keeps the task)
    first: set[tuple[int, int]] = set()
    for row_id, task_id, labeler_id in conn.execute(
        sa.select(demonstrations.c.id, demonstrations.c.task_id, demonstrations.c.labeler_id)
        .where(demonstrations.c.task_id.is_not(None))
        .order_by(demonstrations.c.id)
    ).all():
        if (task_id, labeler_id) in first:
            conn.execute(demonstrations.update().where(demonstrations.c.id == row_id).values(task_id=None))
        first.add((task_id, labeler_id))
    # the latest vote of a voter on a message stays
    latest = sa.select(sa.func.max(votes.c.id)).group_by(votes.c.message_id, votes.c.voter)
    conn.execute(votes.delete().where(votes.c.id.not_in(latest)))

    with op.batch_alter_table("rankings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("slot", sa.Integer(), nullable=True))
    _number_by_task(conn, rankings)
    with op.batch_alter_table("rankings", schema=None) as batch_op:
        batch_op.alter_column("slot", existing_type=sa.Integer(), nullable=False)
        batch_op.create_unique_constraint("uq_rankings_task_slot", ["task_id", "slot"])
        batch_op.create_check_constraint("ck_rankings_slot", "slot >= 0")

    with op.batch_alter_table("demonstrations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("slot", sa.Integer(), nullable=True))
    _number_by_task(conn, demonstrations)
    with op.batch_alter_table("demonstrations", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_demonstrations_task_labeler", ["task_id", "labeler_id"])
        batch_op.create_unique_constraint("uq_demonstrations_task_slot", ["task_id", "slot"])
        batch_op.create_check_constraint(
            "ck_demonstrations_slot", "(task_id IS NULL) = (slot IS NULL) AND (slot IS NULL OR slot >= 0)"
        )

    with op.batch_alter_table("votes", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_votes_message_voter", ["message_id", "voter"])


def downgrade() -> None:
    with op.batch_alter_table("votes", schema=None) as batch_op:
        batch_op.drop_constraint("uq_votes_message_voter", type_="unique")
    with op.batch_alter_table("demonstrations", schema=None) as batch_op:
        batch_op.drop_constraint("ck_demonstrations_slot", type_="check")
        batch_op.drop_constraint("uq_demonstrations_task_slot", type_="unique")
        batch_op.drop_constraint("uq_demonstrations_task_labeler", type_="unique")
        batch_op.drop_column("slot")
    with op.batch_alter_table("rankings", schema=None) as batch_op:
        batch_op.drop_constraint("ck_rankings_slot", type_="check")
        batch_op.drop_constraint("uq_rankings_task_slot", type_="unique")
        batch_op.drop_column("slot")
