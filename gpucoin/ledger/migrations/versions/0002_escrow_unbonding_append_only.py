"""Two-phase escrows, unbonding by maturity epoch, operation epochs, append-only triggers.

Revision ID: 0002
Revises: 0001

A ledger written before this revision gets its escrow rows rebuilt by replaying its operations
through ``gpucoin.ledger.state.apply_operation`` (it never unbonded: nothing did before).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import sqlite

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BIGINT = sa.BigInteger().with_variant(sqlite.INTEGER(), "sqlite")
STRICT = {"sqlite_strict": True}
APPEND_ONLY = ("message", "operation", "transfer")
GENESIS_HASH = "00" * 32


def upgrade() -> None:
    op.add_column("operation", sa.Column("epoch", BIGINT, nullable=True))
    op.add_column("operation", sa.Column("unbonding_epochs", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "escrow",
        sa.Column("account", sa.Text, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("amount", BIGINT, nullable=False),
        sa.Column("phase", sa.Text, nullable=False),
        sa.Column("op_id", sa.Text, sa.ForeignKey("operation.op_id"), nullable=False),
        sa.CheckConstraint("amount > 0", name="ck_escrow_amount_positive"),
        sa.CheckConstraint("phase IN ('pending', 'posted', 'voided')", name="ck_escrow_phase"),
        **STRICT,
    )
    op.create_table(
        "unbonding",
        sa.Column("account", sa.Text, primary_key=True),
        sa.Column("mature_epoch", BIGINT, primary_key=True, autoincrement=False),
        sa.Column("amount", BIGINT, nullable=False),
        sa.CheckConstraint("amount > 0", name="ck_unbonding_amount_positive"),
        **STRICT,
    )
    conn = op.get_bind()
    if not conn.execute(sa.text("SELECT 1 FROM chain_head WHERE id = 1")).first():
        conn.execute(
            sa.text("INSERT INTO chain_head (id, last_transfer_id, last_hash) VALUES (1, 0, :h)"), {"h": GENESIS_HASH}
        )
    _rebuild_escrows(conn)
    if conn.dialect.name == "postgresql":
        op.execute(
            """CREATE OR REPLACE FUNCTION gpucoin_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'gpucoin ledger: % on % refused, the table is append-only', TG_OP, TG_TABLE_NAME;
            END $$"""
        )
        for table in APPEND_ONLY:
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


def _rebuild_escrows(conn: sa.Connection) -> None:
    """Replay the operations already stored and write the escrows they created."""
    from gpucoin.ledger.state import LedgerState, apply_operation
    from gpucoin.ledger.transfer import Transfer

    ops = conn.execute(sa.text("SELECT op_id FROM operation ORDER BY first_transfer_id")).all()
    if not ops:
        return
    state = LedgerState()
    created: dict[str, str] = {}
    for (op_id,) in ops:
        rows = conn.execute(
            sa.text("SELECT debit, credit, amount, code, digest FROM transfer WHERE op_id = :o ORDER BY seq"),
            {"o": op_id},
        ).all()
        before = set(state.escrows)
        state = apply_operation(state, [Transfer(*r) for r in rows])
        created.update({acct: op_id for acct in set(state.escrows) - before})
    for acct, esc in state.escrows.items():
        conn.execute(
            sa.text("INSERT INTO escrow (account, source, amount, phase, op_id) VALUES (:a, :s, :m, :p, :o)"),
            {"a": acct, "s": esc.source, "m": esc.amount, "p": esc.phase, "o": created[acct]},
        )


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        for table in APPEND_ONLY:
            op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER {table}_no_truncate ON {table}")
        op.execute("DROP FUNCTION gpucoin_append_only()")
    else:
        for table in APPEND_ONLY:
            op.execute(f"DROP TRIGGER {table}_no_update")
            op.execute(f"DROP TRIGGER {table}_no_delete")
    op.drop_table("unbonding")
    op.drop_table("escrow")
    op.drop_column("operation", "unbonding_epochs")
    op.drop_column("operation", "epoch")
