"""Unit tests of discovery's SQLite address book."""

from __future__ import annotations

from pathlib import Path

from prime.protocol.discovery import NodeAddress
from prime.roles.discovery.store import DiscoveryStore

A = "0x" + "A" * 40
B = "0x" + "B" * 40
C = "0x" + "C" * 40


def test_upsert_get_and_list_by_run(tmp_path: Path) -> None:
    store = DiscoveryStore.open(tmp_path)
    try:
        assert store.get(A) is None
        store.upsert(NodeAddress(A, "10.0.0.1", 8001, 1, 100.0))
        store.upsert(NodeAddress(B, "::1", 8002, 1, 101.0))
        store.upsert(NodeAddress(C, "10.0.0.3", 8003, 2, 102.0))
        assert store.get(A) == NodeAddress(A, "10.0.0.1", 8001, 1, 100.0)
        assert [n.address for n in store.run_nodes(1)] == [A, B]
        assert [n.address for n in store.run_nodes(2)] == [C]
        assert store.run_nodes(3) == []
        assert store.count() == 3
    finally:
        store.close()


def test_reannounce_replaces_the_record_including_its_run(tmp_path: Path) -> None:
    store = DiscoveryStore.open(tmp_path)
    try:
        store.upsert(NodeAddress(A, "10.0.0.1", 8001, 1, 100.0))
        store.upsert(NodeAddress(A, "10.0.0.9", 9001, 2, 200.0))
        assert store.get(A) == NodeAddress(A, "10.0.0.9", 9001, 2, 200.0)
        assert store.run_nodes(1) == []
        assert store.count() == 1
    finally:
        store.close()


def test_records_survive_reopening(tmp_path: Path) -> None:
    store = DiscoveryStore.open(tmp_path / "data")
    store.upsert(NodeAddress(A, "10.0.0.1", 8001, 1, 100.0))
    store.close()
    reopened = DiscoveryStore.open(tmp_path / "data")  # also re-runs the migrations: must be idempotent
    try:
        assert reopened.get(A) == NodeAddress(A, "10.0.0.1", 8001, 1, 100.0)
    finally:
        reopened.close()
