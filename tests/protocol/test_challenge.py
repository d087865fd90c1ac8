"""The challenge messages (prime.protocol.challenge): round trips, and hostile input refused by decoding."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from typing import Any

import msgspec
import numpy as np
import pytest

from prime.challenge.prover import RowOpening
from prime.protocol.challenge import (
    MAX_N,
    MAX_OPEN_ROWS,
    MAX_PATH,
    MAX_ROW_BYTES,
    MAX_ROWS,
    MESSAGES,
    ChallengeRequest,
    CommitmentAnswer,
    Message,
    OpenedRow,
    OpeningAnswer,
    OpenRequest,
    decode,
    decoder,
    encode,
    opening_answer_limit,
)

ROOT = bytes(range(32))
REQUEST = {"id": "c-1_x", "seed": 2**64 - 1, "n": 64, "dtype": "float16", "repeat": 4, "parts": 1}
COMMITMENT = {"id": "c-1_x", "root": base64.b64encode(ROOT).decode(), "n": 64, "dtype": "float16",
              "repeat": 4, "elapsed_s": 0.25, "backend": "numpy"}
ROW = {"index": 3, "values": base64.b64encode(np.arange(4, dtype="<f4").tobytes()).decode(),
       "path": [base64.b64encode(ROOT).decode()] * 2}
OPENING = {"id": "c-1_x", "rows": [ROW]}
DEEP = "[" * 100_000 + "]" * 100_000


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def refused(message: type[Message], data: bytes | str) -> str:
    """decode must refuse ``data`` with msgspec's own error (never RecursionError, TypeError, ...)."""
    with pytest.raises(msgspec.DecodeError) as caught:  # ValidationError is a DecodeError
        decode(message, data)
    return str(caught.value)


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("message, data", [
    (ChallengeRequest, REQUEST), (CommitmentAnswer, COMMITMENT), (OpenRequest, {"rows": [0, 5, 63]}),
    (OpenedRow, ROW), (OpeningAnswer, OPENING),
])
def test_each_message_round_trips_through_its_json(message: type[Message], data: dict[str, Any]) -> None:
    decoded = decode(message, raw(data))
    assert json.loads(encode(decoded)) == data
    assert decode(message, encode(decoded)) == decoded
    assert decoder(message) is decoder(message)  # one decoder per type, made once


def test_defaults_and_derived_sizes() -> None:
    request = decode(ChallengeRequest, b'{"id": "a", "seed": 0, "n": 8}')
    assert (request.dtype, request.repeat, request.inner, request.flops) == ("float32", 1, 8, 2 * 8**3)


def test_rows_travel_as_base64_of_little_endian_float32() -> None:
    values = np.array([1.5, -0.0, np.inf, 2.0**-8, 65504.0], dtype=np.float32)
    wire = RowOpening(index=7, values=values, path=[ROOT]).to_wire()
    text = json.loads(encode(wire))
    assert base64.b64decode(text["values"]) == values.astype("<f4").tobytes()
    assert text["path"] == [base64.b64encode(ROOT).decode()]
    back = RowOpening.from_wire(decode(OpenedRow, encode(wire)), 5)
    assert back.index == 7 and back.path == [ROOT]
    assert back.values.dtype == np.dtype("<f4") and np.array_equal(back.values.view(np.uint32),
                                                                     values.view(np.uint32))


@pytest.mark.parametrize("count", [0, 4, 6, 9, 12])
def test_a_row_of_other_than_n_values_is_refused_in_the_decode_path(count: int) -> None:
    row = decode(OpenedRow, raw({**ROW, "values": base64.b64encode(bytes(count)).decode()}))
    with pytest.raises(ValueError, match="must be 8 bytes"):
        RowOpening.from_wire(row, 2)


def test_an_honest_answer_fits_the_validators_read_limit() -> None:
    for n, rows in ((1, 1), (2, 2), (1000, 132), (MAX_N, 3)):
        depth = (n - 1).bit_length()
        answer = OpeningAnswer(id="x" * 64, rows=[
            OpenedRow(index=i, values=bytes(4 * n), path=[ROOT] * depth) for i in range(rows)])
        assert len(encode(answer)) <= opening_answer_limit(rows, n)
    assert opening_answer_limit(132, 8192) < 6_000_000  # a few MB, not what a hostile peer likes


def test_every_message_has_a_json_schema() -> None:
    schemas, components = msgspec.json.schema_components(MESSAGES)
    assert len(schemas) == len(MESSAGES)
    row = components["OpenedRow"]["properties"]
    assert row["values"]["contentEncoding"] == "base64" and row["index"]["maximum"] == MAX_ROWS - 1
    assert all(c["additionalProperties"] is False for c in components.values())


def test_the_module_imports_no_role_and_no_challenge_code() -> None:
    code = ("import sys, prime.protocol.challenge; "
            "bad = [m for m in sys.modules if m.startswith(('prime.roles', 'prime.challenge'))]; "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# ---------------------------------------------------------------- hostile input
@pytest.mark.parametrize("change, words", [
    ({"n": True}, "Expected `int`, got `bool`"),
    ({"n": 64.0}, "Expected `int`, got `float`"),
    ({"n": "64"}, "Expected `int`, got `str`"),
    ({"n": None}, "Expected `int`, got `null`"),
    ({"n": 0}, ">= 1"),
    ({"n": MAX_N + 1}, "<= 32768"),
    ({"n": -1}, ">= 1"),
    ({"n": 1 << 63}, "<= 32768"),
    ({"n": 1 << 64}, ""),
    ({"seed": -1}, ">= 0"),
    ({"seed": 1 << 64}, "seed must be below 2**64"),
    ({"seed": 10**30}, ""),
    ({"seed": 1.5}, "Expected `int`, got `float`"),
    ({"repeat": 0}, ">= 1"),
    ({"repeat": 4097}, "<= 4096"),
    ({"n": 32768, "repeat": 128}, "n * repeat must not exceed 2097152"),  # MAX_INNER = 2**21 since issue 12
    ({"parts": 0}, ">= 1"),
    ({"parts": 17}, "<= 16"),  # one part per GPU; a host has at most 16
    ({"parts": True}, "Expected `int`, got `bool`"),
    ({"parts": 1 << 70}, ""),
    ({"dtype": "float64"}, "Invalid enum value 'float64'"),
    ({"dtype": "FLOAT32"}, "Invalid enum value"),
    ({"dtype": 3}, ""),
    ({"id": ""}, "length >= 1"),
    ({"id": "x" * 65}, "length <= 64"),
    ({"id": "x" * 100_000}, "length <= 64"),
    ({"id": "../etc"}, "matching regex"),
    ({"id": "abc\n"}, "matching regex"),
    ({"id": "a b"}, "matching regex"),
    ({"id": 5}, "Expected `str`, got `int`"),
    ({"extra": 1}, "unknown field `extra`"),
])
def test_a_bad_challenge_request_is_refused_naming_the_problem(change: dict[str, Any], words: str) -> None:
    assert words in refused(ChallengeRequest, raw({**REQUEST, **change}))


def test_huge_integers_are_refused_without_being_built() -> None:
    text = raw(REQUEST).decode().replace('"n": 64', '"n": ' + "9" * 100_000)
    assert "out of range" in refused(ChallengeRequest, text)


@pytest.mark.parametrize("field", ["id", "seed", "n", "dtype", "repeat", "unknown"])
def test_deep_nesting_inside_any_field_is_a_clean_validation_error(field: str) -> None:
    text = raw({**REQUEST, field: 0}).decode().replace(f'"{field}": 0', f'"{field}": {DEEP}')
    refused(ChallengeRequest, text)


@pytest.mark.parametrize("message, field", [
    (OpenRequest, "rows"), (CommitmentAnswer, "root"), (CommitmentAnswer, "elapsed_s"),
    (OpeningAnswer, "rows"), (OpenedRow, "values"), (OpenedRow, "path"), (OpenedRow, "index"),
])
def test_deep_nesting_in_every_message(message: type[Message], field: str) -> None:
    base = {OpenRequest: {"rows": [1]}, CommitmentAnswer: COMMITMENT, OpeningAnswer: OPENING, OpenedRow: ROW}[message]
    text = raw({**base, field: 0}).decode().replace(f'"{field}": 0', f'"{field}": {DEEP}')
    refused(message, text)
    refused(message, DEEP)
    refused(message, "{" * 100_000)


@pytest.mark.parametrize("data", [
    b"", b"null", b"[]", b"{", b'{"rows": [1]} trailing', b'{"rows": [1]}{}', b"\xff\xfe",
    b'{"rows": []}', b'{"rows": [1, 1]}', b'{"rows": [-1]}', b'{"rows": [524288]}', b'{"rows": [true]}',
    b'{"rows": ["1"]}', b'{"rows": [1.0]}', b'{"rows": 1}', b'{"rows": {"0": 1}}', b'{}', b'{"rows": [1], "x": 0}',
    raw({"rows": list(range(MAX_OPEN_ROWS + 1))}), b'{"rows": [[[[[[[[1]]]]]]]]}',
])
def test_bad_open_requests_are_refused(data: bytes) -> None:
    refused(OpenRequest, data)


def test_open_request_limits() -> None:
    assert len(decode(OpenRequest, raw({"rows": list(range(MAX_OPEN_ROWS))})).rows) == MAX_OPEN_ROWS
    assert "distinct" in refused(OpenRequest, b'{"rows": [2, 3, 2]}')


@pytest.mark.parametrize("change, words", [
    ({"root": base64.b64encode(bytes(31)).decode()}, "length >= 32"),
    ({"root": base64.b64encode(bytes(33)).decode()}, "length <= 32"),
    ({"root": ROOT.hex()}, ""),                          # hex is not the encoding
    ({"root": "not base64!"}, "Invalid base64"),
    ({"elapsed_s": -1}, ">= 0.0"),
    ({"elapsed_s": 1e400}, ""),                          # inf
    ({"elapsed_s": "1"}, "Expected `float`, got `str`"),
    ({"elapsed_s": True}, "Expected `float`, got `bool`"),
    ({"backend": "x" * 65}, "length <= 64"),
    ({"backend": None}, ""),
    ({"dtype": "int8"}, "Invalid enum value"),
    ({"n": 0}, ">= 1"),
    ({"nonce": 1}, "unknown field `nonce`"),
])
def test_bad_commitments_are_refused(change: dict[str, Any], words: str) -> None:
    assert words in refused(CommitmentAnswer, raw({**COMMITMENT, **change}))
    assert "required field `root`" in refused(CommitmentAnswer, raw({k: v for k, v in COMMITMENT.items() if k != "root"}))


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_seconds_are_refused(text: str) -> None:
    refused(CommitmentAnswer, raw(COMMITMENT).decode().replace('"elapsed_s": 0.25', f'"elapsed_s": {text}'))


@pytest.mark.parametrize("change", [
    {"index": -1}, {"index": MAX_ROWS}, {"index": True}, {"index": 1 << 80}, {"index": "3"},
    {"values": "!!!!"}, {"values": base64.b64encode(bytes(MAX_ROW_BYTES + 1)).decode()}, {"values": [0.0, 1.0]},
    {"values": None}, {"path": [base64.b64encode(bytes(31)).decode()]}, {"path": [ROOT.hex()]},
    {"path": [base64.b64encode(ROOT).decode()] * (MAX_PATH + 1)}, {"path": "AAAA"}, {"path": [[]]},
    {"extra": {}},
])
def test_bad_opened_rows_are_refused_alone_and_inside_an_answer(change: dict[str, Any]) -> None:
    row = {**ROW, **change}
    refused(OpenedRow, raw(row))
    refused(OpeningAnswer, raw({"id": "c-1_x", "rows": [ROW, row]}))


def test_bad_opening_answers_are_refused() -> None:
    refused(OpeningAnswer, raw({"rows": [ROW]}))
    refused(OpeningAnswer, raw({**OPENING, "id": "no/slash"}))
    refused(OpeningAnswer, raw({**OPENING, "rows": ROW}))
    refused(OpeningAnswer, raw({**OPENING, "rows": [ROW] * (MAX_OPEN_ROWS + 1)}))
    refused(OpeningAnswer, raw({**OPENING, "more": []}))
