"""Tamper-evident audit: one hash chain with signed checkpoints, in SQLite (embedded, shared by
the processes of one host) or PostgreSQL (shared by every replica)."""

from bastion.audit.chain import GENESIS, chain_hash, checkpoint_message, encode_body
from bastion.audit.log import AuditLog
from bastion.audit.sink import AuditSink, SQLiteSink
from bastion.audit.verify import VerifyReport, verify_audit

__all__ = [
    "GENESIS",
    "AuditLog",
    "AuditSink",
    "SQLiteSink",
    "VerifyReport",
    "chain_hash",
    "checkpoint_message",
    "encode_body",
    "verify_audit",
]
