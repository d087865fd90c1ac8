"""Unit tests of the discovery client's record parsing and error mapping (the peer is a stub here;
the real service is exercised in test_service.py)."""

from __future__ import annotations

from typing import Any

import pytest

from prime.clients.discovery import UNKNOWN_NODE, DiscoveryClient, discovery_uri, split_discovery_uri
from prime.errors import PeerError
from prime.protocol.discovery import NodeAddress

ADDRESS = "0x" + "ab" * 20
SIGNER = "0x" + "d1" * 20  # the discovery's own key
URI = f"http://d#{SIGNER}"
RECORD = {"address": ADDRESS, "ip": "10.0.0.7", "port": 8091, "run_id": 3, "updated_at": 1700000000.5}


def test_url_of_ipv4_and_ipv6() -> None:
    assert NodeAddress(ADDRESS, "10.0.0.7", 8091, 3, 0.0).url == "http://10.0.0.7:8091"
    assert NodeAddress(ADDRESS, "2001:db8::1", 443, 3, 0.0).url == "http://[2001:db8::1]:443"


def test_record_round_trips_through_json() -> None:
    record = NodeAddress.from_json(RECORD)
    assert record == NodeAddress(ADDRESS, "10.0.0.7", 8091, 3, 1700000000.5)
    assert NodeAddress.from_json(record.to_json()) == record


@pytest.mark.parametrize(
    "change",
    [
        {"ip": "node.example.com"},
        {"ip": 167772167},
        {"port": 0},
        {"port": 65536},
        {"port": True},
        {"port": "8091"},
        {"run_id": -1},
        {"updated_at": "yesterday"},
        {"address": ""},
    ],
)
def test_malformed_record_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        NodeAddress.from_json({**RECORD, **change})


def test_record_missing_a_field_or_not_an_object_is_refused() -> None:
    with pytest.raises(ValueError, match="port"):
        NodeAddress.from_json({k: v for k, v in RECORD.items() if k != "port"})
    with pytest.raises(ValueError):
        NodeAddress.from_json([RECORD])


class StubSignedClient:
    """Answers every request with one canned answer (or raises it) and records what was asked."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, Any]] = []

    async def request(self, method: str, url: str, *, audience: str, json: Any = None, params: Any = None) -> Any:
        assert audience == SIGNER  # every call is addressed to the key the URI names
        self.calls.append((method, url, json))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def test_announce_puts_the_body_and_parses_the_record() -> None:
    stub = StubSignedClient(RECORD)
    record = await DiscoveryClient(stub, f"http://127.0.0.1:8090/#{SIGNER}").announce("10.0.0.7", 8091, 3)
    assert stub.calls == [("PUT", "http://127.0.0.1:8090/nodes", {"ip": "10.0.0.7", "port": 8091, "run_id": 3})]
    assert record.url == "http://10.0.0.7:8091"


async def test_get_node_is_none_only_for_the_services_unknown_node_answer() -> None:
    unknown = PeerError("not found", status=404, body={"error": UNKNOWN_NODE, "detail": "..."})
    assert await DiscoveryClient(StubSignedClient(unknown), URI).get_node(ADDRESS) is None

    wrong_url = PeerError("not found", status=404, body={"error": "not found", "detail": "no route"})
    with pytest.raises(PeerError):
        await DiscoveryClient(StubSignedClient(wrong_url), URI).get_node(ADDRESS)

    forbidden = PeerError("forbidden", status=403, body={"error": "forbidden"})
    with pytest.raises(PeerError) as info:
        await DiscoveryClient(StubSignedClient(forbidden), URI).get_node(ADDRESS)
    assert info.value.status == 403


async def test_malformed_answers_raise_peer_error() -> None:
    with pytest.raises(PeerError, match="malformed"):
        await DiscoveryClient(StubSignedClient({"ip": "x"}), URI).get_node(ADDRESS)
    with pytest.raises(PeerError, match="node list"):
        await DiscoveryClient(StubSignedClient({"nodes": "none"}), URI).run_nodes(3)
    with pytest.raises(PeerError, match="malformed"):
        await DiscoveryClient(StubSignedClient({"nodes": [RECORD, {"port": 1}]}), URI).run_nodes(3)


async def test_run_nodes_parses_every_record() -> None:
    other = {**RECORD, "address": "0x" + "cd" * 20, "ip": "::1"}
    stub = StubSignedClient({"run_id": 3, "nodes": [RECORD, other]})
    nodes = await DiscoveryClient(stub, URI).run_nodes(3)
    assert stub.calls[0][:2] == ("GET", "http://d/runs/3/nodes")
    assert [n.url for n in nodes] == ["http://10.0.0.7:8091", "http://[::1]:8091"]


def test_a_discovery_uri_names_its_signer_in_the_fragment() -> None:
    assert split_discovery_uri(f"http://d:1/#{SIGNER}") == ("http://d:1", SIGNER)
    assert split_discovery_uri("http://d:1") == ("http://d:1", None)
    assert split_discovery_uri("http://d:1#0x12") == ("http://d:1", None)  # not an address: no signer
    assert discovery_uri("https://d:1/", SIGNER) == f"https://d:1#{SIGNER}"
    for base, signer in (("ftp://d", SIGNER), ("http://d#x", SIGNER), ("http://d", "0x12")):
        with pytest.raises(ValueError):
            discovery_uri(base, signer)


async def test_a_uri_without_a_signer_is_never_asked() -> None:
    stub = StubSignedClient(RECORD)
    with pytest.raises(PeerError, match="names no signing address"):
        await DiscoveryClient(stub, "http://d").get_node(ADDRESS)  # type: ignore[arg-type]
    assert stub.calls == []
