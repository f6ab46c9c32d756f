"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 02:08:20.882956
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('name', name=op.f('uq_api_tokens_name')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_tokens_token_hash'))
    )
    op.create_table('audit_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=100), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('target_type', sa.String(length=32), nullable=False),
    sa.Column('target_id', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_action'), ['action'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_at'), ['at'], unique=False)

    op.create_table('blobs',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('media_type', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sha256', name=op.f('pk_blobs'))
    )
    op.create_table('datasets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('spec', sa.String(length=300), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('source', sa.String(length=300), nullable=True),
    sa.Column('documents', sa.Integer(), nullable=True),
    sa.Column('tokens', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets')),
    sa.UniqueConstraint('spec', name=op.f('uq_datasets_spec'))
    )
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('hf_id', sa.String(length=200), nullable=False),
    sa.Column('revision', sa.String(length=100), nullable=False),
    sa.Column('commit', sa.String(length=64), nullable=True),
    sa.Column('model_type', sa.String(length=64), nullable=True),
    sa.Column('num_layers', sa.Integer(), nullable=True),
    sa.Column('num_attention_heads', sa.Integer(), nullable=True),
    sa.Column('num_kv_heads', sa.Integer(), nullable=True),
    sa.Column('head_dim', sa.Integer(), nullable=True),
    sa.Column('qk_norm', sa.Boolean(), nullable=True),
    sa.Column('qkv_bias', sa.Boolean(), nullable=True),
    sa.Column('rope', sa.Boolean(), nullable=True),
    sa.Column('sliding_window', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('hf_id', 'revision', name=op.f('uq_models_hf_id_revision'))
    )
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_models_hf_id'), ['hf_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_models_model_type'), ['model_type'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('token_id', sa.Integer(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('request', sa.JSON(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('phase', sa.String(length=200), nullable=True),
    sa.Column('tokens_done', sa.BigInteger(), nullable=False),
    sa.Column('tokens_total', sa.BigInteger(), nullable=False),
    sa.Column('steps_done', sa.Integer(), nullable=False),
    sa.Column('steps_total', sa.Integer(), nullable=False),
    sa.Column('fraction', sa.Double(), nullable=False),
    sa.Column('eta_seconds', sa.Double(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('claimed_by', sa.String(length=100), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_jobs_model_id_models')),
    sa.ForeignKeyConstraint(['token_id'], ['api_tokens.id'], name=op.f('fk_jobs_token_id_api_tokens')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
    sa.UniqueConstraint('token_id', 'idempotency_key', name=op.f('uq_jobs_token_id_idempotency_key'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_model_id'), ['model_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_status'), ['status'], unique=False)

    op.create_table('filter_sets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('num_layers', sa.Integer(), nullable=False),
    sa.Column('num_kv_heads', sa.Integer(), nullable=False),
    sa.Column('head_dim', sa.Integer(), nullable=False),
    sa.Column('verdict', sa.String(length=8), nullable=False),
    sa.Column('verdict_detail', sa.JSON(), nullable=False),
    sa.Column('provenance', sa.JSON(), nullable=False),
    sa.Column('dataset_specs', sa.JSON(), nullable=False),
    sa.Column('report_json_sha256', sa.String(length=64), nullable=False),
    sa.Column('report_html_sha256', sa.String(length=64), nullable=False),
    sa.Column('report_md_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_filter_sets_job_id_jobs')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_filter_sets_model_id_models')),
    sa.ForeignKeyConstraint(['report_html_sha256'], ['blobs.sha256'], name=op.f('fk_filter_sets_report_html_sha256_blobs')),
    sa.ForeignKeyConstraint(['report_json_sha256'], ['blobs.sha256'], name=op.f('fk_filter_sets_report_json_sha256_blobs')),
    sa.ForeignKeyConstraint(['report_md_sha256'], ['blobs.sha256'], name=op.f('fk_filter_sets_report_md_sha256_blobs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_filter_sets')),
    sa.UniqueConstraint('job_id', name=op.f('uq_filter_sets_job_id')),
    sa.UniqueConstraint('model_id', 'version', name=op.f('uq_filter_sets_model_id_version'))
    )
    with op.batch_alter_table('filter_sets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_filter_sets_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_filter_sets_model_id'), ['model_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_filter_sets_sha256'), ['sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_filter_sets_verdict'), ['verdict'], unique=False)

    op.create_table('job_datasets',
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_job_datasets_dataset_id_datasets')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_datasets_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'role', 'position', name=op.f('pk_job_datasets'))
    )
    with op.batch_alter_table('job_datasets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_datasets_dataset_id'), ['dataset_id'], unique=False)

    op.create_table('aliases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('filter_set_id', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_by', sa.String(length=100), nullable=False),
    sa.ForeignKeyConstraint(['filter_set_id'], ['filter_sets.id'], name=op.f('fk_aliases_filter_set_id_filter_sets')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_aliases_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_aliases')),
    sa.UniqueConstraint('model_id', 'name', name=op.f('uq_aliases_model_id_name'))
    )
    op.create_table('filter_set_files',
    sa.Column('filter_set_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('blob_sha256', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['blob_sha256'], ['blobs.sha256'], name=op.f('fk_filter_set_files_blob_sha256_blobs')),
    sa.ForeignKeyConstraint(['filter_set_id'], ['filter_sets.id'], name=op.f('fk_filter_set_files_filter_set_id_filter_sets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('filter_set_id', 'name', name=op.f('pk_filter_set_files'))
    )
    op.create_table('publications',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('filter_set_id', sa.Integer(), nullable=False),
    sa.Column('repo_id', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('forced', sa.Boolean(), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('url', sa.String(length=500), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['filter_set_id'], ['filter_sets.id'], name=op.f('fk_publications_filter_set_id_filter_sets')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_publications'))
    )
    with op.batch_alter_table('publications', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_publications_filter_set_id'), ['filter_set_id'], unique=False)

    op.create_table('alias_moves',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('alias_id', sa.Integer(), nullable=False),
    sa.Column('from_filter_set_id', sa.Integer(), nullable=True),
    sa.Column('to_filter_set_id', sa.Integer(), nullable=False),
    sa.Column('moved_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('moved_by', sa.String(length=100), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['alias_id'], ['aliases.id'], name=op.f('fk_alias_moves_alias_id_aliases'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['from_filter_set_id'], ['filter_sets.id'], name=op.f('fk_alias_moves_from_filter_set_id_filter_sets')),
    sa.ForeignKeyConstraint(['to_filter_set_id'], ['filter_sets.id'], name=op.f('fk_alias_moves_to_filter_set_id_filter_sets')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alias_moves'))
    )
    with op.batch_alter_table('alias_moves', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alias_moves_alias_id'), ['alias_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('alias_moves', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alias_moves_alias_id'))

    op.drop_table('alias_moves')
    with op.batch_alter_table('publications', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_publications_filter_set_id'))

    op.drop_table('publications')
    op.drop_table('filter_set_files')
    op.drop_table('aliases')
    with op.batch_alter_table('job_datasets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_datasets_dataset_id'))

    op.drop_table('job_datasets')
    with op.batch_alter_table('filter_sets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_filter_sets_verdict'))
        batch_op.drop_index(batch_op.f('ix_filter_sets_sha256'))
        batch_op.drop_index(batch_op.f('ix_filter_sets_model_id'))
        batch_op.drop_index(batch_op.f('ix_filter_sets_created_at'))

    op.drop_table('filter_sets')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_status'))
        batch_op.drop_index(batch_op.f('ix_jobs_model_id'))
        batch_op.drop_index(batch_op.f('ix_jobs_created_at'))

    op.drop_table('jobs')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_models_model_type'))
        batch_op.drop_index(batch_op.f('ix_models_hf_id'))

    op.drop_table('models')
    op.drop_table('datasets')
    op.drop_table('blobs')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_at'))
        batch_op.drop_index(batch_op.f('ix_audit_events_action'))

    op.drop_table('audit_events')
    op.drop_table('api_tokens')
