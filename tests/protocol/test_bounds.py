"""Every number and string of every wire message is bounded at decoding (issue 11).

Each message's valid example is mutated at every number (huge and long integers, numbers
past a float, in raw JSON and as Python values) and every string (a lone UTF-16 surrogate):
decoding answers one ValidationError, never OverflowError, UnicodeEncodeError or a value
that cannot be written back. Untyped parses (``codec.parse``) are bounded in depth.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from prime.protocol import challenge, codec, discovery, heartbeat, invite, nodes, storage, tasks
from prime.protocol.codec import MAX_DEPTH, InvalidJson, ValidationError, decode, deeper_than, parse

ADDRESS = "0x" + "ab" * 20
HASH = base64.b64encode(b"\x01" * 32).decode()
SPEC = {"image": "busybox:1", "command": ["sh", "-c", "true"], "env": {"A": "b"}, "gpus": 1, "replicas": 2,
        "persistent": True, "cpu_limit": 1.5, "memory_limit_mib": 512, "restart": "on-failure"}
REPLICA = {"task_id": "t1", "index": 0, "state": "Running", "node": ADDRESS, "gpu_indices": [0], "attempt": 1,
           "exit_code": 0, "assigned_at": 1.0, "started_at": 2.0, "finished_at": 3.0, "error": "e"}
SAMPLE = {"at": 5.0, "gpus": [{"index": 0, "util": 50.0, "mem_used_mib": 10.0, "temp_c": 40.0}], "load": {"cpu_pct": 3.0}}
HARDWARE = {"gpu_count": 1, "gpu_model": "H100", "gpu_memory_mib": 81920, "cpu_cores": 8, "ram_mib": 1024, "disk_gib": 10}
NODE = {"address": ADDRESS, "state": "Healthy", "joined_on_chain": True, "chain_status": "active", "chain_block": 3,
        "hardware": HARDWARE, "url": "http://x", "approved_at": 1.0, "invited_at": 1.0, "invite_expiry": 9,
        "invite_failures": 1, "next_invite_at": 1.0, "invites_sent": 1, "member_since": 1.0, "last_heartbeat": 1.0,
        "state_since": 1.0, "last_error": "e", "last_sample": SAMPLE}

EXAMPLES: list[tuple[type[Any], dict[str, Any]]] = [
    (heartbeat.HeartbeatRequest, {"tasks": [{"id": "t1", "replica": 0, "state": "Running", "exit_code": 0, "error": "e"}],
                                  "gpus": SAMPLE["gpus"], "load": {"cpu_pct": 1.0}}),
    (heartbeat.HeartbeatResponse, {"interval_s": 5.0, "desired": [{"id": "t1", "replica": 0, "attempt": 0,
                                                                   "gpu_indices": [0], "spec": SPEC}]}),
    (heartbeat.DesiredReplica, {"id": "t1", "replica": 0, "attempt": 0, "gpu_indices": [0], "spec": SPEC}),
    (tasks.TaskSpec, SPEC),
    (tasks.TaskView, {"id": "t1", "state": "Running", "spec": SPEC, "created_at": 1.0, "stop_requested": False,
                      "replicas": [REPLICA]}),
    (tasks.ReplicaView, REPLICA),
    (nodes.NodeView, NODE),
    (nodes.Hardware, HARDWARE),
    (nodes.SampleView, SAMPLE),
    (challenge.ChallengeRequest, {"id": "c1", "seed": 5, "n": 64, "dtype": "float32", "repeat": 2}),
    (challenge.CommitmentAnswer, {"id": "c1", "root": HASH, "n": 64, "dtype": "float32", "repeat": 1,
                                  "elapsed_s": 0.5, "backend": "numpy"}),
    (challenge.OpenRequest, {"rows": [0, 3]}),
    (challenge.OpeningAnswer, {"id": "c1", "rows": [{"index": 1, "values": HASH, "path": [HASH]}]}),
    (challenge.VerdictNote, {"approved": True, "reason": "ok", "report_hash": "0x" + "ab" * 32}),
    (invite.InviteBody, {"run_id": 7, "master_url": "http://m", "expiry": 10, "signature": "0x" + "ab" * 65}),
    (invite.InviteAnswer, {"node": ADDRESS, "run_id": 7, "master_url": "http://m", "tx_hash": "0x" + "ab" * 32,
                           "ack": "0x" + "ab" * 65}),
    (discovery.Announcement, {"ip": "10.0.0.1", "port": 80, "run_id": 7}),
    (discovery.NodeAddress, {"address": ADDRESS, "ip": "10.0.0.1", "port": 80, "run_id": 7, "updated_at": 1.0}),
    (discovery.RunNodes, {"run_id": 7, "nodes": [{"address": ADDRESS, "ip": "10.0.0.1", "port": 80, "run_id": 7,
                                                  "updated_at": 1.0}]}),
    (storage.ManifestEntry, {"path": "a/b", "size": 3, "sha256": "ab" * 32}),
]
IDS = [tp.__name__ for tp, _ in EXAMPLES]

# Raw JSON numbers no field may take: past int64, 401 and 5,000 digits, past a float.
HOSTILE_NUMBERS = ["1" * 401, "-" + "9" * 401, "7" * 5000, "1e400", "-1e400", str(2**64), "1" + "0" * 400 + ".5"]
HOSTILE_VALUES = [10**400, -(10**400), 10**5000, 2**64]  # as Python values (json.loads would give them)
LONE = "\ud800"


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, (*path, i))
    else:
        yield path, value


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


def _numbers(example: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [p for p, v in _leaves(example) if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _strings(example: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [p for p, v in _leaves(example) if isinstance(v, str)]


MARK = "@@HOSTILE@@"


def _raw_with(example: dict[str, Any], path: tuple[Any, ...], raw_json: str) -> bytes:
    return json.dumps(_replace(example, path, MARK)).replace(f'"{MARK}"', raw_json).encode()


@pytest.mark.parametrize(("tp", "example"), EXAMPLES, ids=IDS)
def test_each_example_decodes(tp: type[Any], example: dict[str, Any]) -> None:
    decode(json.dumps(example).encode(), tp)
    decode(example, tp)


@pytest.mark.parametrize(("tp", "example"), EXAMPLES, ids=IDS)
def test_every_number_is_range_checked(tp: type[Any], example: dict[str, Any]) -> None:
    paths = _numbers(example)
    assert paths or tp in (discovery.Announcement,) or not paths
    for path in paths:
        for raw in HOSTILE_NUMBERS:
            with pytest.raises(ValidationError):
                decode(_raw_with(example, path, raw), tp)
        for value in HOSTILE_VALUES:
            with pytest.raises(ValidationError):
                decode(_replace(example, path, value), tp)
        for value in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValidationError):
                decode(_replace(example, path, value), tp)


@pytest.mark.parametrize(("tp", "example"), EXAMPLES, ids=IDS)
def test_every_string_refuses_a_lone_surrogate(tp: type[Any], example: dict[str, Any]) -> None:
    for path in _strings(example):
        for raw in ('"\\ud800"', '"a\\udfff"', '"\\ud800x"'):
            with pytest.raises(ValidationError):
                decode(_raw_with(example, path, raw), tp)
        with pytest.raises(ValidationError):
            decode(_replace(example, path, "x" + LONE), tp)


@pytest.mark.parametrize(("tp", "key"), [(tasks.TaskSpec, "env"), (heartbeat.HeartbeatRequest, "load")])
def test_dict_keys_refuse_a_lone_surrogate(tp: type[Any], key: str) -> None:
    example = dict(next(e for t, e in EXAMPLES if t is tp))
    value = next(iter(example[key].values()))
    body = json.dumps({**example, key: {MARK: value}}).replace(MARK, "A\\ud800").encode()
    with pytest.raises(ValidationError):
        decode(body, tp)
    with pytest.raises(ValidationError):
        decode({**example, key: {"A" + LONE: value}}, tp)


def test_the_surrogate_error_says_what_it_is() -> None:
    with pytest.raises(InvalidJson) as err:
        decode(b'{"image": "busybox", "env": {"A": "\\ud800"}}', tasks.TaskSpec)
    assert "surrogate" in err.value.message


def test_every_protocol_number_has_bounds() -> None:
    """No int or float field of a wire struct is left without both bounds (or a post-init check)."""
    unbounded: list[str] = []
    modules = (heartbeat, tasks, nodes, challenge, invite, discovery, storage, codec)
    seen: set[type[Any]] = set()

    def visit(t: msgspec.inspect.Type, where: str) -> None:
        if isinstance(t, msgspec.inspect.IntType):
            if t.ge is None and t.gt is None or t.le is None and t.lt is None:
                if not where.endswith("seed"):  # < 2**64, checked in ChallengeRequest.__post_init__
                    unbounded.append(where)
        elif isinstance(t, msgspec.inspect.FloatType):
            if t.ge is None and t.gt is None or t.le is None and t.lt is None:
                unbounded.append(where)
        elif isinstance(t, msgspec.inspect.UnionType):
            for member in t.types:
                visit(member, where)
        elif isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.VarTupleType)):
            visit(t.item_type, f"{where}[]")
        elif isinstance(t, msgspec.inspect.DictType):
            visit(t.value_type, f"{where}{{}}")
        elif isinstance(t, msgspec.inspect.StructType) and t.cls not in seen:
            seen.add(t.cls)
            for f in t.fields:
                visit(f.type, f"{t.cls.__name__}.{f.name}")

    from prime.protocol import answers

    for module in (*modules, answers):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, msgspec.Struct) and value.__module__ == module.__name__:
                visit(msgspec.inspect.type_info(value), value.__name__)
    assert not unbounded, unbounded


# --- untyped parses: bounded depth --------------------------------------------------------------


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b"[" * 200_000,  # never closed
    b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
    b'[{"x": "]]]\\"}"}, ' + b"[" * 70 + b"]" * 70 + b"]",
])
def test_parse_refuses_deep_json(body: bytes) -> None:
    with pytest.raises(ValidationError) as err:
        parse(body)
    assert "nested too deeply" in err.value.message


@pytest.mark.parametrize("body", [
    b"[" * MAX_DEPTH + b"]" * MAX_DEPTH,
    json.dumps([{"a": ["[[[[", {"b": '\\"[{'}]}] * 1000).encode(),
    json.dumps({"line": "[" * 1000, "ts": None}).encode(),
    b'"\\\\[[[[["',
])
def test_parse_takes_json_up_to_the_bound(body: bytes) -> None:
    assert parse(body) == json.loads(body)


def test_deeper_than_agrees_with_the_real_depth() -> None:
    import random

    rng = random.Random(11)

    def make(depth: int) -> Any:
        if depth == 0 or rng.random() < 0.1:
            return rng.choice([1, 'a[{\\"', None, "]]]}", 2.5])
        if rng.random() < 0.5:
            return [make(depth - 1) for _ in range(rng.randint(0, 1 if rng.random() < 0.9 else 2))]
        return {f'k{i}"[': make(depth - 1) for i in range(rng.randint(0, 1 if rng.random() < 0.9 else 2))}

    for _ in range(1000):
        value = make(rng.randint(0, 80))
        raw = json.dumps(value).encode()
        for limit in (2, 10, MAX_DEPTH):
            assert deeper_than(raw, limit) == (_depth(value) > limit), raw


@pytest.mark.parametrize("body", [b"", b"[1,", b"\xff", b'"\\ud800"', b"NaN", b"[1] [2]"])
def test_parse_refuses_what_is_not_json(body: bytes) -> None:
    with pytest.raises(InvalidJson):
        parse(body)
