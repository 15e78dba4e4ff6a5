"""The market's domain, one JobOrder per job, and the contiguous WorkReceipts of every rank.

Revision ID: 0003
Revises: 0002

Tables for the admission rules of ``gpucoin.ledger.admission``: ``market`` (the EIP-712 domain
the ledger admits messages from), ``job_order`` and ``work_receipt``, all append-only. A ledger
written before this revision gets them filled from its stored messages, in recording order (the
first order of a job; every receipt whose rank and start step are not taken yet); it stays bound
to no domain until a ``Ledger`` opened with one binds it; the domain then applies to messages
recorded from then on (``market.first_message_id``).
"""

import json

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import sqlite

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BIGINT = sa.BigInteger().with_variant(sqlite.INTEGER(), "sqlite")
STRICT = {"sqlite_strict": True}
APPEND_ONLY = ("market", "job_order", "work_receipt")


def upgrade() -> None:
    op.create_table(
        "market",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("domain", sa.Text, nullable=False),
        sa.Column("bound_at", BIGINT, nullable=False),
        sa.Column("first_message_id", BIGINT, nullable=False),
        sa.CheckConstraint("id = 1", name="ck_market_single_row"),
        **STRICT,
    )
    op.create_table(
        "job_order",
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("digest", sa.Text, sa.ForeignKey("message.digest"), nullable=False, unique=True),
        **STRICT,
    )
    op.create_table(
        "work_receipt",
        sa.Column("digest", sa.Text, sa.ForeignKey("message.digest"), primary_key=True),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("rank", BIGINT, nullable=False),
        sa.Column("step_start", BIGINT, nullable=False),
        sa.Column("step_end", BIGINT, nullable=False),
        sa.UniqueConstraint("job_id", "rank", "step_start", name="uq_work_receipt_rank_start"),
        sa.CheckConstraint("step_end > step_start AND step_start >= 0", name="ck_work_receipt_steps"),
        **STRICT,
    )
    _fill_from_messages(op.get_bind())
    if op.get_bind().dialect.name == "postgresql":
        for table in APPEND_ONLY:  # gpucoin_append_only() comes from revision 0002
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION gpucoin_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION gpucoin_append_only()"
            )
    else:
        for table in APPEND_ONLY:
            for verb in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} BEGIN "
                    f"SELECT RAISE(ABORT, 'gpucoin ledger: {verb} on {table} refused, the table is append-only'); END"
                )


def _fill_from_messages(conn: sa.Connection) -> None:
    """Index the JobOrders and WorkReceipts a pre-0003 ledger already holds."""
    jobs: set[str] = set()
    starts: set[tuple[str, int, int]] = set()
    rows = conn.execute(
        sa.text(
            "SELECT digest, primary_type, typed_data FROM message "
            "WHERE primary_type IN ('JobOrder', 'WorkReceipt') ORDER BY id"
        )
    )
    for digest, primary_type, text in rows.all():
        try:
            m = json.loads(text)["message"]
            job, rank, start, end = m["jobId"], m.get("rank"), m.get("stepStart"), m.get("stepEnd")
        except (TypeError, ValueError, KeyError):
            continue  # a row that does not parse: left out here, named by `gpucoin ledger audit`
        if primary_type == "WorkReceipt" and not all(isinstance(v, int) for v in (rank, start, end)):
            continue
        if primary_type == "JobOrder" and job not in jobs:
            jobs.add(job)
            conn.execute(sa.text("INSERT INTO job_order (job_id, digest) VALUES (:j, :d)"), {"j": job, "d": digest})
        elif primary_type == "WorkReceipt":
            key = (job, rank, start)
            if key in starts or end <= start:
                continue
            starts.add(key)
            conn.execute(
                sa.text(
                    "INSERT INTO work_receipt (digest, job_id, rank, step_start, step_end) VALUES (:d, :j, :r, :s, :e)"
                ),
                {"d": digest, "j": job, "r": rank, "s": start, "e": end},
            )


def downgrade() -> None:
    for table in ("work_receipt", "job_order", "market"):
        op.drop_table(table)
