"""Stores: memory (tests), SQLite (the default, one machine) and PostgreSQL (several machines).

Every store is used from one thread, the worker's I/O thread. All SQL takes its values as parameters.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any
from urllib.parse import urlsplit

from ._errors import ConfigurationError, StoreError
from ._types import InboxStore

DEFAULT_STORE_URL = "sqlite:///sagas.db"


class MemoryStore:
    """Keeps everything in this process; lost when it exits. For tests and demos."""

    def __init__(self) -> None:
        self._inbox: set[tuple[str, str]] = set()

    def seen(self, consumer: str, message_id: str) -> bool:
        return (consumer, message_id) in self._inbox

    def remember(self, consumer: str, message_id: str) -> None:
        self._inbox.add((consumer, message_id))

    def close(self) -> None:
        pass


class SQLiteStore:
    """An SQLite file in WAL mode.

    ``synchronous=NORMAL`` (the default here) survives any process crash; a power loss can roll back
    the last transactions. Pass ``synchronous="FULL"`` (``?synchronous=full`` in the URL) to survive
    that too, at about one fsync per commit.
    """

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = path
        try:
            if path != ":memory:" and os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS inbox ("
                " consumer TEXT NOT NULL, message_id TEXT NOT NULL, handled_at REAL NOT NULL,"
                " PRIMARY KEY (consumer, message_id)) WITHOUT ROWID"
            )
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the SQLite store at {path!r}: {exc}") from exc

    def seen(self, consumer: str, message_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM inbox WHERE consumer = ? AND message_id = ?", (consumer, message_id)
        ).fetchone()
        return row is not None

    def remember(self, consumer: str, message_id: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO inbox (consumer, message_id, handled_at) VALUES (?, ?, ?)",
            (consumer, message_id, time.time()),
        )

    def close(self) -> None:
        self._db.close()


class PostgresStore:
    """PostgreSQL through psycopg 3 (``pip install 'sagas[postgres]'``), for workers on several machines.

    Tables live in ``schema`` (default ``public``), so several apps or test runs can share a database.
    """

    def __init__(self, url: str, *, schema: str = "public") -> None:
        try:
            import psycopg
            from psycopg import sql
        except ImportError:
            raise ConfigurationError(
                "the PostgreSQL store needs psycopg: pip install 'sagas[postgres]'"
            ) from None
        if not schema.replace("_", "").isalnum():
            raise ConfigurationError(f"invalid schema name {schema!r}")
        self._sql = sql
        self.schema = schema
        try:
            self._db: Any = psycopg.connect(url, autocommit=True, connect_timeout=10)
            self._db.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            self._db.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.inbox ("
                " consumer TEXT NOT NULL, message_id TEXT NOT NULL,"
                " handled_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (consumer, message_id))"
            ).format(sql.Identifier(schema)))
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the PostgreSQL store: {exc}") from None
        self._seen = sql.SQL("SELECT 1 FROM {}.inbox WHERE consumer = %s AND message_id = %s").format(
            sql.Identifier(schema))
        self._remember = sql.SQL(
            "INSERT INTO {}.inbox (consumer, message_id) VALUES (%s, %s) ON CONFLICT DO NOTHING"
        ).format(sql.Identifier(schema))

    def seen(self, consumer: str, message_id: str) -> bool:
        return self._db.execute(self._seen, (consumer, message_id)).fetchone() is not None

    def remember(self, consumer: str, message_id: str) -> None:
        self._db.execute(self._remember, (consumer, message_id))

    def close(self) -> None:
        self._db.close()


def open_store(url: str | InboxStore | None = None) -> InboxStore:
    """Open a store from a URL: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs/path.db``
    (optionally ``?synchronous=full``), or ``postgresql://user@host/db`` (optionally ``?schema=name``)."""
    if url is None:
        url = os.environ.get("SAGAS_STORE_URL") or DEFAULT_STORE_URL
    if not isinstance(url, str):
        return url
    parts = urlsplit(url)
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    if parts.scheme == "memory":
        return MemoryStore()
    if parts.scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ConfigurationError("sqlite store URL needs a path: sqlite:///sagas.db or sqlite:////abs/sagas.db")
        return SQLiteStore(path, synchronous=query.get("synchronous", "NORMAL"))
    if parts.scheme in ("postgresql", "postgres"):
        schema = query.pop("schema", "public")
        rest = "&".join(f"{k}={v}" for k, v in query.items())
        return PostgresStore(parts._replace(query=rest).geturl(), schema=schema)
    raise ConfigurationError(
        f"unknown store URL scheme {parts.scheme!r}: use memory://, sqlite:///path or postgresql://..."
    )
