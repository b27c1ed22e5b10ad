"""job_samples: each live job's history for its charts

Revision ID: 0005
Revises: 0004

Progress, loss, cost so far, and the job's cost per work hour against the
best available offer's, a point each time they move (``ControlPlane.
record_history``), so a job page charts the whole run, not only what a
dashboard saw while it was open.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("cost_per_work_hour", sa.Float(), nullable=True),
        sa.Column("best_cost_per_work_hour", sa.Float(), nullable=True),
        sa.Column("best_offer_id", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_samples_job_time", "job_samples", ["job_id", "time"])


def downgrade() -> None:
    op.drop_index("ix_job_samples_job_time", table_name="job_samples")
    op.drop_table("job_samples")
