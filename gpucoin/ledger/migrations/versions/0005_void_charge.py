"""Void charges: the void intervals of jobs whose package is not vetted, charged and burned.

Revision ID: 0005
Revises: 0004

One append-only row per interval a Settlement of a void VerificationReport charged to its job's
escrow and burned (``gpucoin.ledger.authorize``): an interval is charged once, whether it
settled or was void, so ``(job_id, step_start)`` is unique here and checked against
``interval_charge`` by the rules.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import sqlite

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BIGINT = sa.BigInteger().with_variant(sqlite.INTEGER(), "sqlite")
STRICT = {"sqlite_strict": True}


def upgrade() -> None:
    op.create_table(
        "void_charge",
        sa.Column("settlement", sa.Text, sa.ForeignKey("message.digest"), primary_key=True),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("step_start", BIGINT, nullable=False),
        sa.Column("epoch", BIGINT, nullable=False),
        sa.Column("payment", BIGINT, nullable=False),
        sa.Column("op_id", sa.Text, sa.ForeignKey("operation.op_id"), nullable=False),
        sa.UniqueConstraint("job_id", "step_start", name="uq_void_charge_interval"),
        sa.CheckConstraint("payment > 0", name="ck_void_charge_payment_positive"),
        **STRICT,
    )
    if op.get_bind().dialect.name == "postgresql":  # gpucoin_append_only() comes from revision 0002
        op.execute(
            "CREATE TRIGGER void_charge_append_only BEFORE UPDATE OR DELETE ON void_charge "
            "FOR EACH ROW EXECUTE FUNCTION gpucoin_append_only()"
        )
        op.execute(
            "CREATE TRIGGER void_charge_no_truncate BEFORE TRUNCATE ON void_charge "
            "FOR EACH STATEMENT EXECUTE FUNCTION gpucoin_append_only()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER void_charge_no_{verb.lower()} BEFORE {verb} ON void_charge BEGIN "
                f"SELECT RAISE(ABORT, 'gpucoin ledger: {verb} on void_charge refused, the table is append-only'); END"
            )


def downgrade() -> None:
    op.drop_table("void_charge")
