"""NPC profiles, dialogue sessions and their messages.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "npc_profiles",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "npc_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("npc_id", sa.String(64), nullable=False),
        sa.Column("player_name", sa.String(100)),
        sa.Column("seed", sa.BigInteger),
        sa.Column("turns", sa.Integer, nullable=False),
        sa.Column("lock_token", sa.String(64)),
        sa.Column("locked_at", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_npc_sessions_npc_id", "npc_sessions", ["npc_id"])
    op.create_table(
        "npc_messages",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("session_id", sa.String(64), sa.ForeignKey("npc_sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("meta", sa.JSON),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("session_id", "position", name="uq_npc_messages_session_position"),
    )
    op.create_index("ix_npc_messages_session_id", "npc_messages", ["session_id"])


def downgrade() -> None:
    op.drop_index("ix_npc_messages_session_id", table_name="npc_messages")
    op.drop_table("npc_messages")
    op.drop_index("ix_npc_sessions_npc_id", table_name="npc_sessions")
    op.drop_table("npc_sessions")
    op.drop_table("npc_profiles")
