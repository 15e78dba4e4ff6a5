"""Rewinds: a job trains steps again, and its receipts, charges and void charges carry an attempt.

Revision ID: 0007
Revises: 0006

A coordinator-signed Rewind supersedes a job's receipts from its ``toStep`` on
(``gpucoin.ledger.admission``); the ranks then receipt those steps again. So a (job, rank,
step) may have a receipt per attempt (the number of Rewinds of the job recorded before it), and
an interval a charge or void charge per attempt. ``rewind`` holds one append-only row per
Rewind. Rows written before keep attempt 0. SQLite cannot change a table's UNIQUE constraint in
place: Alembic's batch mode rebuilds the three tables there (from the definitions below, so no
CHECK is lost), and their append-only triggers are made again.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import sqlite

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BIGINT = sa.BigInteger().with_variant(sqlite.INTEGER(), "sqlite")
STRICT = {"sqlite_strict": True}
REKEYED = {  # table -> (its unique constraint, the columns it held before this revision)
    "work_receipt": ("uq_work_receipt_rank_start", ["job_id", "rank", "step_start"]),
    "interval_charge": ("uq_interval_charge_interval", ["job_id", "step_start"]),
    "void_charge": ("uq_void_charge_interval", ["job_id", "step_start"]),
}


def _before(name: str) -> sa.Table:
    """The table as revisions 0003-0005 made it (what SQLite's rebuild copies from)."""
    meta = sa.MetaData()
    sa.Table("message", meta, sa.Column("digest", sa.Text, primary_key=True))
    sa.Table("operation", meta, sa.Column("op_id", sa.Text, primary_key=True))
    unique, columns = REKEYED[name]
    digest = sa.Column(
        "settlement" if name != "work_receipt" else "digest", sa.Text, sa.ForeignKey("message.digest"), primary_key=True
    )
    op_id = sa.Column("op_id", sa.Text, sa.ForeignKey("operation.op_id"), nullable=False)
    if name == "work_receipt":
        body = [
            sa.Column("job_id", sa.Text, nullable=False),
            sa.Column("rank", BIGINT, nullable=False),
            sa.Column("step_start", BIGINT, nullable=False),
            sa.Column("step_end", BIGINT, nullable=False),
            sa.CheckConstraint("step_end > step_start AND step_start >= 0", name="ck_work_receipt_steps"),
        ]
    elif name == "interval_charge":
        body = [
            sa.Column("job_id", sa.Text, nullable=False),
            sa.Column("step_start", BIGINT, nullable=False),
            sa.Column("epoch", BIGINT, nullable=False, index=True),
            sa.Column("payment", BIGINT, nullable=False),
            sa.Column("verifier", sa.Text, nullable=True),
            sa.Column("receipts", sa.Text, nullable=False),
            sa.Column("workers", sa.Text, nullable=False),
            op_id,
            sa.CheckConstraint("payment > 0", name="ck_interval_charge_payment_positive"),
        ]
    else:
        body = [
            sa.Column("job_id", sa.Text, nullable=False),
            sa.Column("step_start", BIGINT, nullable=False),
            sa.Column("epoch", BIGINT, nullable=False),
            sa.Column("payment", BIGINT, nullable=False),
            op_id,
            sa.CheckConstraint("payment > 0", name="ck_void_charge_payment_positive"),
        ]
    return sa.Table(name, meta, digest, *body, sa.UniqueConstraint(*columns, name=unique), **STRICT)


def _append_only(table: str) -> None:
    if op.get_bind().dialect.name == "postgresql":  # gpucoin_append_only() comes from revision 0002
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION gpucoin_append_only()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION gpucoin_append_only()"
        )
        return
    for verb in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} BEGIN "
            f"SELECT RAISE(ABORT, 'gpucoin ledger: {verb} on {table} refused, the table is append-only'); END"
        )


def _rekey(table: str, with_attempt: bool) -> None:
    unique, columns = REKEYED[table]
    sqlite_rebuild = op.get_bind().dialect.name == "sqlite"
    before = _before(table)
    if with_attempt:
        copy_from = before
    else:
        copy_from = before.to_metadata(sa.MetaData())
        copy_from.append_column(sa.Column("attempt", BIGINT, nullable=False, server_default="0"))
        for c in list(copy_from.constraints):
            if c.name == unique:
                copy_from.constraints.remove(c)
        copy_from.append_constraint(sa.UniqueConstraint(*columns, "attempt", name=unique))
    with op.batch_alter_table(table, copy_from=copy_from, table_kwargs=STRICT) as batch:
        batch.drop_constraint(unique, type_="unique")
        if with_attempt:
            batch.add_column(sa.Column("attempt", BIGINT, nullable=False, server_default="0"))
            batch.create_unique_constraint(unique, [*columns, "attempt"])
        else:
            batch.drop_column("attempt")
            batch.create_unique_constraint(unique, columns)
    if sqlite_rebuild:  # the rebuilt table lost the old one's triggers and its index
        _append_only(table)
        if table == "interval_charge":
            op.execute("CREATE INDEX IF NOT EXISTS ix_interval_charge_epoch ON interval_charge (epoch)")


def upgrade() -> None:
    for table in REKEYED:
        _rekey(table, with_attempt=True)
    op.create_table(
        "rewind",
        sa.Column("digest", sa.Text, sa.ForeignKey("message.digest"), primary_key=True),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("attempt", BIGINT, nullable=False),
        sa.Column("to_step", BIGINT, nullable=False),
        sa.UniqueConstraint("job_id", "attempt", name="uq_rewind_job_attempt"),
        sa.CheckConstraint("attempt > 0 AND to_step >= 0", name="ck_rewind_attempt"),
        **STRICT,
    )
    _append_only("rewind")


def downgrade() -> None:
    """Refused by the database's unique constraints if a job was rewound (its re-run rows collide)."""
    op.drop_table("rewind")
    for table in REKEYED:
        _rekey(table, with_attempt=False)
