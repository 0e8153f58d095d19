"""Rate-limit, quota and privacy-budget state behind one narrow, atomic interface.

`StateStore` (in `base`) is the interface every backend implements; the arithmetic (`admit`,
`spend`) is shared by all of them. The backends, one module each:

- `memory`: in-process (`MemoryStateStore`), lost on restart, per worker;
- `leased`: the shared-ledger store (`LeasedStateStore`): blocks leased from a `Ledger`, spent
  in memory, given back at shutdown;
- `sqlite`: the ledger in a SQLite file (one host);
- `redis`, `postgres`: the ledger shared by every replica (imported only when configured: their
  client libraries are not loaded by a server that does not use them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bastion.state.base import (
    BUDGET_SLACK,
    DAY,
    EVERYONE,
    Admission,
    BudgetKey,
    BudgetSpend,
    LimitSpec,
    StateStore,
    admit,
    spend,
    unavailable,
)
from bastion.state.leased import BUDGET, QUOTA, Book, LeasedStateStore, Ledger, Return, block_size
from bastion.state.memory import MemoryStateStore
from bastion.state.sqlite import SQLiteLedger, SQLiteStateStore

if TYPE_CHECKING:
    from bastion.state.postgres import PostgresLedger, PostgresStateStore
    from bastion.state.redis import RedisLedger, RedisStateStore

__all__ = [
    "BUDGET",
    "BUDGET_SLACK",
    "DAY",
    "EVERYONE",
    "QUOTA",
    "Admission",
    "Book",
    "BudgetKey",
    "BudgetSpend",
    "LeasedStateStore",
    "Ledger",
    "LimitSpec",
    "MemoryStateStore",
    "PostgresLedger",
    "PostgresStateStore",
    "RedisLedger",
    "RedisStateStore",
    "Return",
    "SQLiteLedger",
    "SQLiteStateStore",
    "StateStore",
    "admit",
    "block_size",
    "spend",
    "unavailable",
]

_LAZY = {
    "RedisLedger": "bastion.state.redis",
    "RedisStateStore": "bastion.state.redis",
    "PostgresLedger": "bastion.state.postgres",
    "PostgresStateStore": "bastion.state.postgres",
}


def __getattr__(name: str) -> Any:
    # The Redis and PostgreSQL clients load only when a backend is asked for by name.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bastion.state' has no attribute {name!r}")
