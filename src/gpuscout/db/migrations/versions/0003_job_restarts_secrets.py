"""jobs.restarts, jobs.launch_failures, jobs.secrets_sealed, instances.setup_s

Revision ID: 0003
Revises: 0002

restarts: how many times the job's command was restarted after failing
(max_restarts_on_errors); launch_failures: consecutive launches refused for a
reason other than capacity (bounded, then the job fails); secrets_sealed: the
job's secret values, encrypted (gpuscout.secretbox), never in clear text.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("restarts", sa.Integer(), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("launch_failures", sa.Integer(), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("secrets_sealed", sa.Text(), nullable=True))
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("setup_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("setup_s")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("secrets_sealed")
        batch_op.drop_column("launch_failures")
        batch_op.drop_column("restarts")
