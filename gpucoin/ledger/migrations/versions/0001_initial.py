"""The first ledger schema: messages, operations, hash-chained transfers, balances, chain head.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import sqlite

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIGINT = sa.BigInteger().with_variant(sqlite.INTEGER(), "sqlite")
STRICT = {"sqlite_strict": True}


def upgrade() -> None:
    op.create_table(
        "message",
        sa.Column("id", BIGINT, primary_key=True, autoincrement=True),
        sa.Column("digest", sa.Text, nullable=False, unique=True),
        sa.Column("primary_type", sa.Text, nullable=False, index=True),
        sa.Column("signer", sa.Text, nullable=False),
        sa.Column("nonce", sa.Text, nullable=True),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("typed_data", sa.Text, nullable=False),
        sa.Column("recorded_at", BIGINT, nullable=False),
        sa.UniqueConstraint("signer", "nonce", name="uq_message_signer_nonce"),
        **STRICT,
    )
    op.create_table(
        "operation",
        sa.Column("op_id", sa.Text, primary_key=True),
        sa.Column("content_hash", sa.Text, nullable=False),
        sa.Column("memo", sa.Text, nullable=False),
        sa.Column("first_transfer_id", BIGINT, nullable=False),
        sa.Column("n_transfers", sa.Integer, nullable=False),
        sa.Column("created_at", BIGINT, nullable=False),
        sa.CheckConstraint("n_transfers >= 1", name="ck_operation_n_transfers"),
        **STRICT,
    )
    op.create_table(
        "transfer",
        sa.Column("id", BIGINT, primary_key=True, autoincrement=False),
        sa.Column("op_id", sa.Text, sa.ForeignKey("operation.op_id"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("debit", sa.Text, nullable=False, index=True),
        sa.Column("credit", sa.Text, nullable=False, index=True),
        sa.Column("amount", BIGINT, nullable=False),
        sa.Column("code", sa.Text, nullable=False, index=True),
        sa.Column("digest", sa.Text, sa.ForeignKey("message.digest"), nullable=False, index=True),
        sa.Column("created_at", BIGINT, nullable=False),
        sa.Column("prev_hash", sa.Text, nullable=False),
        sa.Column("row_hash", sa.Text, nullable=False),
        sa.CheckConstraint("amount > 0", name="ck_transfer_amount_positive"),
        sa.CheckConstraint("debit <> credit", name="ck_transfer_two_accounts"),
        sa.UniqueConstraint("op_id", "seq", name="uq_transfer_op_seq"),
        **STRICT,
    )
    op.create_table(
        "account",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("balance", BIGINT, nullable=False),
        sa.CheckConstraint("balance >= 0 OR name = 'system:issuance'", name="ck_account_not_negative"),
        **STRICT,
    )
    op.create_table(
        "chain_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("last_transfer_id", BIGINT, nullable=False),
        sa.Column("last_hash", sa.Text, nullable=False),
        sa.CheckConstraint("id = 1", name="ck_chain_head_single_row"),
        **STRICT,
    )


def downgrade() -> None:
    for table in ("chain_head", "account", "transfer", "operation", "message"):
        op.drop_table(table)
