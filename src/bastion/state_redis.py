"""Moved to `bastion.state.redis`; this name stays importable."""

from bastion.state.redis import RedisLedger, RedisStateStore

__all__ = ["RedisLedger", "RedisStateStore"]
