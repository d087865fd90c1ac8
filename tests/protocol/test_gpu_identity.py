"""The GPU identity a commitment carries (gpu_uuids, driver): bounded, canonical, optional."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec
import pytest

from prime.protocol.challenge import (
    COMMITMENT_ANSWER_LIMIT,
    GPU_UUID_LENGTH,
    MAX_GPUS,
    CommitmentAnswer,
    DriverIdentity,
    decode,
    encode,
)

ROOT = base64.b64encode(bytes(range(32))).decode()
BASE = {"id": "c" * 64, "root": ROOT, "n": 32768, "dtype": "bfloat16", "repeat": 4, "elapsed_s": 86400.0,
        "backend": "b" * 64}


def uuid(i: int, prefix: str = "GPU") -> str:
    return f"{prefix}-{i:08x}-1111-2222-3333-444444444444"


def answer(**fields: Any) -> bytes:
    return json.dumps({**BASE, **fields}).encode()


def refused(data: bytes) -> str:
    with pytest.raises(msgspec.ValidationError) as caught:
        decode(CommitmentAnswer, data)
    return str(caught.value)


def test_an_answer_without_identity_decodes_and_encodes_without_it() -> None:
    """A CPU node, or a miner from before these fields: nothing sent, nothing added to its JSON."""
    decoded = decode(CommitmentAnswer, answer())
    assert decoded.gpu_uuids == [] and decoded.driver is None
    assert json.loads(encode(decoded)) == BASE


def test_an_answer_with_identity_round_trips() -> None:
    fields = {"gpu_uuids": [uuid(1), uuid(3, "MIG")], "driver": {"version": "550.54.15", "cuda": "12.4"}}
    decoded = decode(CommitmentAnswer, answer(**fields))
    assert decoded.gpu_uuids == [uuid(1), uuid(3, "MIG")]
    assert decoded.driver == DriverIdentity(version="550.54.15", cuda="12.4")
    assert json.loads(encode(decoded)) == {**BASE, **fields}
    assert decode(CommitmentAnswer, answer(driver={"version": "535.104.05"})).driver == DriverIdentity("535.104.05")


def test_the_largest_identity_fits_the_commitment_limit_the_validator_reads() -> None:
    fields = {"gpu_uuids": [uuid(i) for i in range(MAX_GPUS)], "driver": {"version": "9" * 32, "cuda": "999.999"}}
    data = answer(**fields)
    assert len(data) <= COMMITMENT_ANSWER_LIMIT
    assert len(decode(CommitmentAnswer, data).gpu_uuids) == MAX_GPUS
    assert "length <= 64" in refused(answer(gpu_uuids=[uuid(i) for i in range(MAX_GPUS + 1)]))


@pytest.mark.parametrize("bad", [
    "", "GPU-aaaa", uuid(0xABCDEF).upper(), uuid(1) + "\n", uuid(1)[:-1] + "g", "NPU" + uuid(1)[3:], uuid(1)[:-1] + "\u00e9",
    "GPU-" + "a" * 5000, " " + uuid(1)[1:], 7, None,
])
def test_a_uuid_of_another_form_is_refused(bad: object) -> None:
    refused(answer(gpu_uuids=[bad]))
    assert GPU_UUID_LENGTH == len(uuid(0))


def test_one_gpu_named_twice_is_refused() -> None:
    assert "distinct" in refused(answer(gpu_uuids=[uuid(1), uuid(2), uuid(1)]))


@pytest.mark.parametrize("driver", [
    {"version": ""}, {"version": "550.54.15\n"}, {"version": "5" * 33}, {"version": "550 54"},
    {"version": "\u0665\u0665\u0660"}, {"version": "550", "cuda": "12"}, {"version": "550", "cuda": "1234.5"},
    {"version": "550", "extra": 1}, {"cuda": "12.4"}, "550.54.15", [], {"version": 550},
])
def test_a_driver_of_another_form_is_refused(driver: object) -> None:
    refused(answer(gpu_uuids=[uuid(1)], driver=driver))


def test_deep_nesting_in_the_new_fields_is_refused_not_a_crash() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    for field in ("gpu_uuids", "driver"):
        data = answer().decode()[:-1] + f', "{field}": {deep}}}'
        with pytest.raises(msgspec.DecodeError):
            decode(CommitmentAnswer, data)
