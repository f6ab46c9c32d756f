"""hub endpoint and publication pushes

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 15:39:38.369623
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hub_repos',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('repo_id', sa.String(length=200), nullable=False),
    sa.Column('author', sa.String(length=96), nullable=False),
    sa.Column('private', sa.Boolean(), nullable=False),
    sa.Column('created_by', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_modified', sa.DateTime(timezone=True), nullable=False),
    sa.Column('library_name', sa.String(length=100), nullable=True),
    sa.Column('card_data', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hub_repos')),
    sa.UniqueConstraint('repo_id', name=op.f('uq_hub_repos_repo_id'))
    )
    with op.batch_alter_table('hub_repos', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hub_repos_author'), ['author'], unique=False)
        batch_op.create_index(batch_op.f('ix_hub_repos_last_modified'), ['last_modified'], unique=False)

    op.create_table('hub_commits',
    sa.Column('sha', sa.String(length=40), nullable=False),
    sa.Column('repo_pk', sa.Integer(), nullable=False),
    sa.Column('parent_sha', sa.String(length=40), nullable=True),
    sa.Column('title', sa.Text(), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('author', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['repo_pk'], ['hub_repos.id'], name=op.f('fk_hub_commits_repo_pk_hub_repos'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('sha', name=op.f('pk_hub_commits'))
    )
    with op.batch_alter_table('hub_commits', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hub_commits_repo_pk'), ['repo_pk'], unique=False)

    op.create_table('hub_repo_tags',
    sa.Column('repo_pk', sa.Integer(), nullable=False),
    sa.Column('tag', sa.String(length=200), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['repo_pk'], ['hub_repos.id'], name=op.f('fk_hub_repo_tags_repo_pk_hub_repos'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('repo_pk', 'tag', name=op.f('pk_hub_repo_tags'))
    )
    with op.batch_alter_table('hub_repo_tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hub_repo_tags_tag'), ['tag'], unique=False)

    op.create_table('hub_commit_files',
    sa.Column('commit_sha', sa.String(length=40), nullable=False),
    sa.Column('path', sa.String(length=500), nullable=False),
    sa.Column('blob_sha256', sa.String(length=64), nullable=False),
    sa.Column('git_oid', sa.String(length=40), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['blob_sha256'], ['blobs.sha256'], name=op.f('fk_hub_commit_files_blob_sha256_blobs')),
    sa.ForeignKeyConstraint(['commit_sha'], ['hub_commits.sha'], name=op.f('fk_hub_commit_files_commit_sha_hub_commits'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('commit_sha', 'path', name=op.f('pk_hub_commit_files'))
    )
    op.create_table('hub_refs',
    sa.Column('repo_pk', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('commit_sha', sa.String(length=40), nullable=False),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['commit_sha'], ['hub_commits.sha'], name=op.f('fk_hub_refs_commit_sha_hub_commits')),
    sa.ForeignKeyConstraint(['repo_pk'], ['hub_repos.id'], name=op.f('fk_hub_refs_repo_pk_hub_repos'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('repo_pk', 'kind', 'name', name=op.f('pk_hub_refs'))
    )
    with op.batch_alter_table('publications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('endpoint', sa.String(length=300), nullable=True))
        batch_op.add_column(sa.Column('tag', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('commit_sha', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('publications', schema=None) as batch_op:
        batch_op.drop_column('updated_at')
        batch_op.drop_column('attempts')
        batch_op.drop_column('commit_sha')
        batch_op.drop_column('tag')
        batch_op.drop_column('endpoint')

    op.drop_table('hub_refs')
    op.drop_table('hub_commit_files')
    with op.batch_alter_table('hub_repo_tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hub_repo_tags_tag'))

    op.drop_table('hub_repo_tags')
    with op.batch_alter_table('hub_commits', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hub_commits_repo_pk'))

    op.drop_table('hub_commits')
    with op.batch_alter_table('hub_repos', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hub_repos_last_modified'))
        batch_op.drop_index(batch_op.f('ix_hub_repos_author'))

    op.drop_table('hub_repos')
