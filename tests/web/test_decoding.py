"""read_json/decode: request bodies into dataclasses, the bad field named (400), the body limit (413)."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from prime.web import ValidationError, decode
from tests.web.support import GOOD_BEAT, Gpu, build_app, fetch


async def test_read_json_decodes_nested_dataclasses(serve) -> None:
    server = await serve(build_app())
    status, body, _ = await fetch(server, "POST", "/heartbeat", json=GOOD_BEAT)
    assert status == 200, body
    assert body["tasks"][1] == {"id": "t2", "state": "exited", "exit_code": 3}
    assert body["gpus"][1] == {"util": 1.0, "mem_used": 0}
    assert body["color"] == "red" and body["note"] is None and body["labels"] == {"zone": "a"}


@pytest.mark.parametrize(
    "change, field_name, words",
    [
        ({"load": True}, "load", "a number"),
        ({"load": "1"}, "load", "a number"),
        ({"gpus": [{"util": 0.5, "mem_used": True}]}, "gpus[0].mem_used", "an integer"),
        ({"gpus": [{"util": 0.5, "mem_used": 1.5}]}, "gpus[0].mem_used", "an integer"),
        ({"tasks": [{"id": 5, "state": "running"}]}, "tasks[0].id", "a string"),
        ({"tasks": [{"id": "t", "state": "paused"}]}, "tasks[0].state", "one of"),
        ({"tasks": [{"id": "t", "state": "exited", "exit_code": "0"}]}, "tasks[0].exit_code", "an integer or null"),
        ({"tasks": {"id": "t"}}, "tasks", "a list"),
        ({"labels": ["a"]}, "labels", "an object"),
        ({"labels": {"zone": 1}}, "labels.zone", "a string"),
        ({"note": 3}, "note", "a string or null"),
        ({"verbose": 1}, "verbose", "a boolean"),
        ({"color": "green"}, "color", "one of"),
        ({"gpus": [{"util": 0.5}]}, "gpus[0].mem_used", "required"),
        ({"load": -1}, "body", "negative"),
    ],
)
async def test_read_json_names_the_bad_field(serve, change: dict, field_name: str, words: str) -> None:
    server = await serve(build_app())
    status, body, _ = await fetch(server, "POST", "/heartbeat", json={**GOOD_BEAT, **change})
    assert status == 400
    assert body["error"] == "invalid_body"
    assert body["detail"].startswith(f"{field_name}:") and words in body["detail"]


async def test_missing_top_level_field(serve) -> None:
    server = await serve(build_app())
    beat = dict(GOOD_BEAT)
    del beat["load"]
    status, body, _ = await fetch(server, "POST", "/heartbeat", json=beat)
    assert (status, body["detail"]) == (400, "load: is required")


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"load": NaN}', b"\xff\xfe"])
async def test_malformed_bodies_are_400_json(serve, raw: bytes) -> None:
    server = await serve(build_app())
    status, body, _ = await fetch(server, "POST", "/heartbeat", data=raw, headers={"Content-Type": "application/json"})
    assert status == 400
    assert body["error"] in ("invalid_json", "invalid_body") and body["detail"]


async def test_body_over_the_limit_is_413_json(serve) -> None:
    server = await serve(build_app(client_max_size=1024))
    status, body, _ = await fetch(server, "POST", "/heartbeat", data=b"{" + b" " * 5000 + b"}")
    assert status == 413 and body["error"] == "request_entity_too_large"


def test_decode_plain_types() -> None:
    assert decode(list[int], [1, 2]) == [1, 2]
    assert decode(tuple[int, str], [1, "a"]) == (1, "a")
    assert decode(dict[str, float], {"a": 1}) == {"a": 1.0}
    assert decode(Optional[Gpu], None) is None
    assert decode(Any, {"x": object}) == {"x": object}
    with pytest.raises(ValidationError) as caught:
        decode(list[int], [1, False])
    assert caught.value.where == "[1]"
