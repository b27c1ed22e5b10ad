"""plane_memory: what the control plane learnt, kept across its restarts

Revision ID: 0004
Revises: 0003

Zones whose spot capacity was just reclaimed and offers that just failed to
launch (each avoided until a time), interruption notices already answered
(so a restart neither records nor answers one twice), and the offers a job
is confined to (the demo's job and market). ``until``: when a row is
forgotten; NULL: kept.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plane_memory",
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Text(), nullable=True),
        sa.Column("until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kind", "name"),
    )


def downgrade() -> None:
    op.drop_table("plane_memory")
