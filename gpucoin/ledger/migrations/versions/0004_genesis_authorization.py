"""Genesis, policies, assignments, reports, interval charges, slashes and closed epochs.

Revision ID: 0004
Revises: 0003

Tables for the authorization rules of ``gpucoin.ledger.authorize`` and the admission rules of
Assignments and VerificationReports (``gpucoin.ledger.admission``), all append-only; the market
row gains the Genesis's digest and policy hash. A ledger written before this revision has no
Genesis: it is filled with the NodeRegistrations and VerificationReports it holds (for the audit's
index comparison), and ``gpucoin ledger audit`` reports it as written before Genesis messages
existed. It admits nothing new (a Genesis must be a ledger's first message).
"""

import json

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import sqlite

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BIGINT = sa.BigInteger().with_variant(sqlite.INTEGER(), "sqlite")
STRICT = {"sqlite_strict": True}
APPEND_ONLY = (
    "policy", "node_registration", "assignment", "verification_report", "interval_charge", "slash", "epoch_close"
)


def _message_fk(name: str = "digest", **kw) -> sa.Column:
    return sa.Column(name, sa.Text, sa.ForeignKey("message.digest"), **kw)


def upgrade() -> None:
    # SQLite's ALTER TABLE ADD COLUMN fires no UPDATE trigger: the append-only market row stays as it is
    op.add_column("market", sa.Column("genesis_digest", sa.Text, nullable=True))
    op.add_column("market", sa.Column("policy_hash", sa.Text, nullable=True))
    op.create_table("policy", sa.Column("hash", sa.Text, primary_key=True), sa.Column("body", sa.Text, nullable=False), **STRICT)
    op.create_table(
        "node_registration",
        _message_fk(primary_key=True),
        sa.Column("provider", sa.Text, nullable=False, index=True),
        sa.Column("node_id", sa.Text, nullable=False),
        **STRICT,
    )
    op.create_table(
        "assignment",
        _message_fk(primary_key=True),
        sa.Column("job_id", sa.Text, nullable=False, index=True),
        sa.Column("rank", BIGINT, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("node_id", sa.Text, nullable=False),
        sa.Column("from_step", BIGINT, nullable=False),
        **STRICT,
    )
    op.create_table(
        "verification_report",
        _message_fk(primary_key=True),
        sa.Column("receipt_digest", sa.Text, nullable=False, index=True),
        sa.Column("verifier", sa.Text, nullable=False),
        sa.Column("verdict", sa.Text, nullable=False),
        **STRICT,
    )
    op.create_table(
        "interval_charge",
        _message_fk("settlement", primary_key=True),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("step_start", BIGINT, nullable=False),
        sa.Column("epoch", BIGINT, nullable=False, index=True),
        sa.Column("payment", BIGINT, nullable=False),
        sa.Column("verifier", sa.Text, nullable=True),
        sa.Column("receipts", sa.Text, nullable=False),
        sa.Column("workers", sa.Text, nullable=False),
        sa.Column("op_id", sa.Text, sa.ForeignKey("operation.op_id"), nullable=False),
        sa.UniqueConstraint("job_id", "step_start", name="uq_interval_charge_interval"),
        sa.CheckConstraint("payment > 0", name="ck_interval_charge_payment_positive"),
        **STRICT,
    )
    op.create_table(
        "slash",
        sa.Column("receipt", sa.Text, primary_key=True),
        _message_fk("settlement", nullable=False, unique=True),
        sa.Column("report", sa.Text, nullable=False),
        sa.Column("op_id", sa.Text, sa.ForeignKey("operation.op_id"), nullable=False),
        **STRICT,
    )
    op.create_table(
        "epoch_close",
        sa.Column("epoch", BIGINT, primary_key=True, autoincrement=False),
        _message_fk(nullable=False, unique=True),
        sa.Column("emission", BIGINT, nullable=False),
        sa.Column("minted", BIGINT, nullable=False),
        sa.Column("payments", BIGINT, nullable=False),
        sa.Column("op_id", sa.Text, sa.ForeignKey("operation.op_id"), nullable=False),
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
    """Index the NodeRegistrations and VerificationReports a pre-0004 ledger already holds."""
    rows = conn.execute(
        sa.text(
            "SELECT digest, primary_type, typed_data FROM message "
            "WHERE primary_type IN ('NodeRegistration', 'VerificationReport') ORDER BY id"
        )
    )
    for digest, primary_type, text in rows.all():
        try:
            m = json.loads(text)["message"]
            if primary_type == "NodeRegistration":
                values = {"d": digest, "p": str(m["provider"]), "n": str(m["nodeId"])}
            else:
                values = {"d": digest, "r": str(m["receiptDigest"]).lower(), "v": str(m["verifier"]), "x": str(m["verdict"])}
        except (TypeError, ValueError, KeyError):
            continue  # a row that does not parse: left out here, named by `gpucoin ledger audit`
        if primary_type == "NodeRegistration":
            conn.execute(sa.text("INSERT INTO node_registration (digest, provider, node_id) VALUES (:d, :p, :n)"), values)
        else:
            conn.execute(
                sa.text("INSERT INTO verification_report (digest, receipt_digest, verifier, verdict) VALUES (:d, :r, :v, :x)"),
                values,
            )


def downgrade() -> None:
    for table in reversed(APPEND_ONLY):
        op.drop_table(table)
    with op.batch_alter_table("market") as batch:
        batch.drop_column("policy_hash")
        batch.drop_column("genesis_digest")
