"""The master's log store (logstore.py): lines per attempt survive a reopen, each attempt knows
how many of its lines were read, a task past its bound loses its oldest lines first and says how
many; lines read back in time order, a tail is the last N of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from prime.roles.master.logkeeper import MAX_LINE_CHARS, LineSplitter, parse_line
from prime.roles.master.logstore import LINE_OVERHEAD, AttemptKey, LogStore, NewLine, ts_key

A0 = AttemptKey("t1", 0, 0)
A1 = AttemptKey("t1", 0, 1)
B0 = AttemptKey("t1", 1, 0)


def _lines(prefix: str, count: int, start: int = 0, *, ts0: float = 100.0) -> list[NewLine]:
    return [NewLine("stdout", f"{prefix} {i}", ts0 + i, i, 0.0) for i in range(start, start + count)]


def _all(store: LogStore, task_id: str = "t1", **kwargs: object) -> list[dict]:
    return store.page_by_time(task_id, replica=kwargs.get("replica"), attempt=kwargs.get("attempt"),  # type: ignore[arg-type]
                              after=None, upto=store.last_id(), limit=100_000)


def test_lines_and_counts_survive_a_reopen(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs.sqlite")
    store.append(A0, "0xnode", _lines("a", 3), received=3)
    store.append(A1, "0xother", _lines("b", 2, ts0=200.0), received=2)
    store.mark_done(A0)
    store.close()

    store = LogStore(tmp_path / "logs.sqlite")
    assert [(r.key, r.node, r.received, r.done) for r in store.attempts("t1")] == [
        (A0, "0xnode", 3, True), (A1, "0xother", 2, False)]
    assert [(x["attempt"], x["node"], x["seq"], x["line"]) for x in _all(store)] == [
        (0, "0xnode", 0, "a 0"), (0, "0xnode", 1, "a 1"), (0, "0xnode", 2, "a 2"),
        (1, "0xother", 0, "b 0"), (1, "0xother", 1, "b 1")]
    assert [x["line"] for x in _all(store, attempt=1)] == ["b 0", "b 1"]
    assert store.attempts("other") == []


def test_received_never_goes_back(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs.sqlite")
    store.append(A0, "0xnode", [], received=10)
    store.append(A0, "0xnode", [], received=4)
    record = store.attempt(A0)
    assert record is not None and record.received == 10


def test_time_order_across_replicas_and_the_tail(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs.sqlite")
    store.append(A0, "n", [NewLine("stdout", "r0 first", "2026-12-02T08:00:01.5Z", 0, 0.0),
                           NewLine("stderr", "r0 second", "2026-12-02T08:00:03.123456789Z", 1, 0.0)], received=2)
    store.append(B0, "n", [NewLine("stdout", "r1 first", "2026-12-02T08:00:02Z", 0, 0.0)], received=1)
    assert [x["line"] for x in _all(store)] == ["r0 first", "r1 first", "r0 second"]
    upto = store.last_id()
    start = store.start_of_tail("t1", 2, replica=None, attempt=None, upto=upto)
    tail = store.page_by_time("t1", replica=None, attempt=None, after=start, upto=upto, inclusive=True)
    assert [x["line"] for x in tail] == ["r1 first", "r0 second"]
    assert store.start_of_tail("t1", 4, replica=None, attempt=None, upto=upto) is None  # fewer lines than that
    assert [x["line"] for x in _all(store, replica=1)] == ["r1 first"]
    assert _all(store)[2]["ts"] == "2026-12-02T08:00:03.123456789Z" and _all(store)[2]["stream"] == "stderr"


def test_a_task_over_its_bound_drops_its_oldest_lines_and_counts_them(tmp_path: Path) -> None:
    per_line = len("x 000") + LINE_OVERHEAD
    store = LogStore(tmp_path / "logs.sqlite", max_bytes_per_task=100 * per_line)
    other = AttemptKey("t2", 0, 0)
    store.append(other, "n", [NewLine("stdout", "y 000", 1.0, 0, 0.0)], received=1)
    dropped = 0
    for batch in range(12):  # 120 lines of attempt 0, then 30 of attempt 1
        key = A0 if batch < 12 else A1
        dropped += store.append(key, "n", [NewLine("stdout", f"x {batch * 10 + i:03d}", float(batch * 10 + i), batch * 10 + i, 0.0)
                                           for i in range(10)], received=batch * 10 + 10)
    dropped += store.append(A1, "n", [NewLine("stdout", f"x {i:03d}", 500.0 + i, i, 0.0) for i in range(30)], received=30)
    kept = _all(store)
    total, task_dropped = store.task_bytes("t1")
    assert total <= 100 * per_line and total == len(kept) * per_line
    assert dropped == task_dropped == 150 - len(kept) > 0
    attempt0 = [x["seq"] for x in kept if x["attempt"] == 0]
    assert attempt0 == list(range(120 - len(attempt0), 120))  # the oldest went first, the rest in order
    assert [x["seq"] for x in kept if x["attempt"] == 1] == list(range(30))
    record = store.attempt(A0)
    assert record is not None and record.dropped == task_dropped and record.received == 120
    assert [x["line"] for x in _all(store, "t2")] == ["y 000"]  # another task is not touched


@pytest.mark.parametrize(("ts", "expected"), [
    ("2026-12-02T08:00:00Z", 1796198400.0),
    ("2026-12-02T08:00:00.25Z", 1796198400.25),
    ("2026-12-02T09:00:00.5+01:00", 1796198400.5),
    (12.5, 12.5),
    (None, 7.0),
    ("yesterday at noon, roughly", 7.0),
    (float("nan"), 7.0),
])
def test_timestamps_as_sort_keys(ts: object, expected: float) -> None:
    assert ts_key(ts, 7.0) == pytest.approx(expected)  # type: ignore[arg-type]


def test_lines_are_split_bounded_and_parsed() -> None:
    splitter = LineSplitter(limit=10)
    out = splitter.feed(b'{"line":"a"}\n\n  \nshort\n0123456789ABC')
    assert out == [(b'{"line":"a', True), (b"short", False), (b"0123456789", True)]  # cut lines come out once
    assert splitter.feed(b"DEF" * 100) == []  # the rest of an endless line is skipped as it comes
    assert splitter.feed(b"GHI\nnext") == []
    assert splitter.close() == [(b"next", False)]

    line = parse_line(b'{"stream":"stderr","line":"hi","ts":"2026-12-02T08:00:00Z","extra":1}', False, 4, 0.0)
    assert (line.stream, line.line, line.ts, line.seq) == ("stderr", "hi", "2026-12-02T08:00:00Z", 4)
    assert parse_line(b'{"stream":"error","line":"forged note"}', False, 0, 0.0).stream == "stdout"
    assert parse_line(b'{"stream":"dropped","line":"x"}', False, 0, 0.0).stream == "stdout"
    text = parse_line(b"not json at all \xff", False, 1, 0.0)
    assert (text.stream, text.line, text.ts) == ("stdout", "not json at all \ufffd", None)
    big = parse_line(b'{"line":"' + b"x" * (MAX_LINE_CHARS + 10) + b'"}', False, 2, 0.0)
    assert big.line.startswith("x" * MAX_LINE_CHARS) and "cut" in big.line and len(big.line) < MAX_LINE_CHARS + 200
    assert "cut" in parse_line(b'{"line":"abc', True, 3, 0.0).line
