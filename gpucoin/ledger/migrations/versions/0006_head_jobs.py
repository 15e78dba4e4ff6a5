"""The head service's jobs: their state, placement and progress, so a restarted head resumes.

Revision ID: 0006
Revises: 0005

``head_job`` is the one mutable table besides the balances: a job's state moves (queued ->
running -> succeeded | failed | cancelled). It holds no money; what a job escrowed, paid and
was refunded stays in the append-only tables.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import sqlite

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BIGINT = sa.BigInteger().with_variant(sqlite.INTEGER(), "sqlite")
STRICT = {"sqlite_strict": True}


def upgrade() -> None:
    op.create_table(
        "head_job",
        sa.Column("job_id", sa.Text, sa.ForeignKey("job_order.job_id"), primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("consumer", sa.Text, nullable=False),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("submitted_ms", BIGINT, nullable=False),
        sa.Column("node_ids", sa.Text, nullable=True),
        sa.Column("verifier_node", sa.Text, nullable=True),
        sa.Column("price", BIGINT, nullable=True),
        sa.Column("package_uri", sa.Text, nullable=True),
        sa.Column("step", BIGINT, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("summary_json", sa.Text, nullable=True),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="ck_head_job_state"
        ),
        **STRICT,
    )


def downgrade() -> None:
    op.drop_table("head_job")
