"""Moved to `bastion.state.postgres`; this name stays importable."""

from bastion.state.postgres import PostgresLedger, PostgresStateStore

__all__ = ["PostgresLedger", "PostgresStateStore"]
