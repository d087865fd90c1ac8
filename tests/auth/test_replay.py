"""Nonce memory: replays refused inside the window, memory bounded, fail closed when full."""

from __future__ import annotations

import pytest

from prime.auth.replay import ReplayCache, ReplayCacheFull


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_second_use_of_a_nonce_is_a_replay() -> None:
    clock = FakeClock()
    cache = ReplayCache(60, clock=clock)
    assert cache.remember("0xAb", "n" * 16, int(clock.now))
    assert not cache.remember("0xAB", "n" * 16, int(clock.now))  # address case does not matter
    assert cache.seen("0xab", "n" * 16)


def test_same_nonce_from_another_signer_is_not_a_replay() -> None:
    cache = ReplayCache(60, clock=FakeClock())
    assert cache.remember("0xa", "n" * 16, 1_000_000)
    assert cache.remember("0xb", "n" * 16, 1_000_000)


def test_entries_expire_after_timestamp_plus_window() -> None:
    clock = FakeClock()
    cache = ReplayCache(60, clock=clock)
    ts = int(clock.now)
    cache.remember("0xa", "old-nonce-000000", ts)
    clock.now = ts + 60  # still inside the window: must still be remembered
    cache.evict_expired()
    assert cache.seen("0xa", "old-nonce-000000")
    clock.now = ts + 62
    cache.remember("0xa", "new-nonce-000000", int(clock.now))  # triggers eviction of the old one
    assert not cache.seen("0xa", "old-nonce-000000")
    assert len(cache) == 1


def test_full_cache_refuses_instead_of_forgetting_live_nonces() -> None:
    clock = FakeClock()
    cache = ReplayCache(60, max_entries=3, clock=clock)
    ts = int(clock.now)
    for i in range(3):
        assert cache.remember("0xa", f"nonce-{i:011d}", ts)
    with pytest.raises(ReplayCacheFull):
        cache.remember("0xa", "nonce-99999999999", ts)
    assert len(cache) == 3
    # Once the old ones expire there is room again.
    clock.now = ts + 100
    assert cache.remember("0xa", "nonce-99999999999", int(clock.now))
    assert len(cache) == 1
