"""Tamper-evident audit: a hash chain in SQLite with signed checkpoints."""

from bastion.audit.chain import GENESIS, chain_hash, checkpoint_message, encode_body
from bastion.audit.log import AuditLog
from bastion.audit.verify import VerifyReport, verify_audit

__all__ = [
    "GENESIS",
    "AuditLog",
    "VerifyReport",
    "chain_hash",
    "checkpoint_message",
    "encode_body",
    "verify_audit",
]
