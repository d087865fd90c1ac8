"""EventFollower on a real anvil: ordered batches from a saved cursor; restarts neither skip nor repeat."""

from __future__ import annotations

import asyncio

import pytest

from prime.chain.events import EventFollower, JsonFileCursor, MemoryCursor, SqliteCursor
from prime.errors import PrimeError
from tests.fixtures.chain import DEFAULT_SPECS, invite_expiry


async def make_history(parties, fresh_account) -> tuple[int, int, int]:
    """A run with a few nodes going through their lifecycle; returns (first block, last block, run id)."""
    first = await parties.reader.block_number() + 1
    run_id = await parties.new_run()
    for _ in range(3):
        provider, node = fresh_account(), fresh_account(0)
        client = parties.as_(provider)
        await client.register_node(run_id, node, DEFAULT_SPECS)
        await parties.validator.report_validation(node, True, b"\x01" * 32)
        expiry = await invite_expiry(parties.reader)
        await client.join_run(run_id, node, expiry, parties.reader.sign_invite(parties.master_account, run_id, node, expiry))
    await parties.buyer.end_run(run_id)
    return first, await parties.reader.block_number(), run_id


def key(event):
    return (event.block, event.log_index, event.tx_hash)


async def drain(follower, *, crash_every: int | None = None, make_follower=None):
    """Poll to the head; every ``crash_every`` batches drop the batch uncommitted and restart."""
    seen, batches = [], 0
    while True:
        events = await follower.poll()
        batches += 1
        if crash_every and events and batches % crash_every == 0:
            follower = make_follower()  # a restarted process: the handled-but-uncommitted batch comes again
            continue
        seen.extend(events)
        await follower.commit(events)
        if follower.caught_up and not events:
            return seen


async def test_restarts_neither_skip_nor_repeat(parties, fresh_account, tmp_path):
    first, last, run_id = await make_history(parties, fresh_account)
    expected = await parties.reader.get_logs(first, last)
    assert len(expected) >= 12 and [e.position for e in expected] == sorted(e.position for e in expected)

    path = tmp_path / "cursor.json"

    def make_follower():
        return EventFollower(parties.reader, None, JsonFileCursor(path), start_block=first, max_blocks=2)

    seen = await drain(make_follower(), crash_every=2, make_follower=make_follower)
    in_range = [e for e in seen if e.block <= last]
    assert [key(e) for e in in_range] == [key(e) for e in expected]
    assert JsonFileCursor(path).get() == await parties.reader.block_number() + 1

    # A follower restarted after everything was committed delivers nothing old.
    assert await make_follower().poll() == []


async def test_filters_by_event_name_and_decodes_args(parties, fresh_account):
    first, last, run_id = await make_history(parties, fresh_account)
    follower = EventFollower(parties.reader, ["NodeJoined", "RunEnded"], MemoryCursor(first))
    events = await follower.poll()
    await follower.commit(events)
    names = [e.name for e in events if e.block <= last]
    assert names == ["NodeJoined"] * 3 + ["RunEnded"]
    joined = events[0]
    assert joined.args["runId"] == run_id and joined.args["master"] == parties.master_account.address
    assert joined.tx_hash.startswith("0x") and len(joined.tx_hash) == 66


async def test_uncommitted_batch_is_polled_again(parties, fresh_account):
    first, last, _ = await make_history(parties, fresh_account)
    follower = EventFollower(parties.reader, ["NodeRegistered"], MemoryCursor(first))
    batch = await follower.poll()
    assert len(batch) == 3
    assert [key(e) for e in await follower.poll()] == [key(e) for e in batch]
    await follower.commit(batch)
    assert await follower.poll() == []


async def test_confirmations_hold_back_recent_blocks(parties, anvil):
    start = await parties.reader.block_number() + 1
    run_id = await parties.new_run()
    follower = EventFollower(parties.reader, ["RunCreated"], MemoryCursor(start), confirmations=3)
    assert await follower.poll() == []
    assert await follower.cursor() == start  # nothing was confirmed, so the cursor did not move
    anvil.rpc("anvil_mine", ["0x3"])
    events = await follower.poll()
    assert [e.args["runId"] for e in events] == [run_id]


async def test_sqlite_cursor_and_async_callables(parties, fresh_account, tmp_path):
    first, last, _ = await make_history(parties, fresh_account)
    store = SqliteCursor(tmp_path / "state.sqlite", name="master")
    assert store.get() is None
    follower = EventFollower(parties.reader, ["NodeValidated"], store, start_block=first)
    assert len(await follower.poll()) == 3
    await follower.commit()
    assert SqliteCursor(tmp_path / "state.sqlite", name="master").get() > last  # persisted, as a reopened store sees
    assert SqliteCursor(tmp_path / "state.sqlite", name="other").get() is None

    saved: dict[str, int] = {"cursor": first}

    async def get() -> int:
        return saved["cursor"]

    async def put(block: int) -> None:
        saved["cursor"] = block

    via_callables = EventFollower(parties.reader, ["NodeValidated"], cursor_get=get, cursor_set=put)
    handled = []
    assert await via_callables.poll_once(handled.extend) == 3
    assert saved["cursor"] > last and len(handled) == 3


async def test_run_loop_delivers_and_stops(parties, fresh_account):
    start = await parties.reader.block_number() + 1
    follower = EventFollower(parties.reader, ["RunCreated"], MemoryCursor(start))
    got: list[int] = []
    stop = asyncio.Event()

    async def handler(events):
        got.extend(e.args["runId"] for e in events)
        stop.set()

    task = asyncio.create_task(follower.run(handler, interval_s=0.05, stop=stop))
    run_id = await parties.new_run()
    await asyncio.wait_for(task, timeout=10)
    assert got == [run_id]
    assert follower.last_poll_at is not None


async def test_unknown_event_name(parties):
    with pytest.raises(PrimeError, match="no event named 'NodeExploded'"):
        EventFollower(parties.reader, ["NodeExploded"])


async def test_corrupt_cursor_file(parties, tmp_path):
    path = tmp_path / "cursor.json"
    path.write_text("{not json")
    follower = EventFollower(parties.reader, None, JsonFileCursor(path))
    with pytest.raises(PrimeError, match="unreadable"):
        await follower.poll()
