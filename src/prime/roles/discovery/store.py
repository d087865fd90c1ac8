"""Discovery's address book: one row per node, kept in SQLite so a restart loses nothing."""

from __future__ import annotations

from pathlib import Path

from prime.protocol.discovery import NodeAddress
from prime.store import Database

DB_FILE = "discovery.sqlite"

# Append-only: prime.store.Database.migrate applies each statement once, in order.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE IF NOT EXISTS nodes (
        address    TEXT PRIMARY KEY,   -- checksum address of the announcing node
        ip         TEXT NOT NULL,
        port       INTEGER NOT NULL,
        run_id     INTEGER NOT NULL,
        updated_at REAL NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS nodes_by_run ON nodes (run_id, address)",
]


class DiscoveryStore:
    """Latest announced address of every node; a re-announce replaces the row."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.db.migrate(MIGRATIONS)

    @classmethod
    def open(cls, data_dir: str | Path) -> DiscoveryStore:
        """Open (creating if needed) the store under ``data_dir``."""
        path = Path(data_dir)
        path.mkdir(parents=True, exist_ok=True)
        return cls(Database(path / DB_FILE))

    def upsert(self, record: NodeAddress) -> NodeAddress:
        self.db.execute(
            """
            INSERT INTO nodes (address, ip, port, run_id, updated_at) VALUES (?, ?, ?, ?, ?)
            ON CONFLICT (address) DO UPDATE SET
                ip = excluded.ip, port = excluded.port, run_id = excluded.run_id, updated_at = excluded.updated_at
            """,
            (record.address, record.ip, record.port, record.run_id, record.updated_at),
        )
        return record

    def get(self, address: str) -> NodeAddress | None:
        rows = self.db.query("SELECT * FROM nodes WHERE address = ?", (address,))
        return _record(rows[0]) if rows else None

    def run_nodes(self, run_id: int) -> list[NodeAddress]:
        rows = self.db.query("SELECT * FROM nodes WHERE run_id = ? ORDER BY address", (run_id,))
        return [_record(row) for row in rows]

    def count(self) -> int:
        return int(self.db.query("SELECT COUNT(*) AS n FROM nodes", ())[0]["n"])

    def close(self) -> None:
        close = getattr(self.db, "close", None)
        if close is not None:
            close()


def _record(row) -> NodeAddress:
    return NodeAddress(
        address=row["address"], ip=row["ip"], port=int(row["port"]), run_id=int(row["run_id"]),
        updated_at=float(row["updated_at"]),
    )
