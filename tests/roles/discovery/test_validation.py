"""Unit tests of discovery's input checks: the announcement message and URL segments (no network)."""

from __future__ import annotations

from typing import Any

import pytest

from prime.protocol.discovery import Announcement
from prime.protocol.errors import ValidationError
from prime.roles.discovery.app import parse_address, parse_run_id


def test_valid_announcements_are_normalised() -> None:
    assert Announcement.from_json({"ip": "10.1.2.3", "port": 1, "run_id": 0}) == Announcement("10.1.2.3", 1, 0)
    assert Announcement.from_json(b'{"ip": "127.0.0.1", "port": 65535, "run_id": 7}').port == 65535
    # IPv6 is stored in its canonical short form so equal addresses compare equal
    assert Announcement.from_json({"ip": "2001:0db8:0000::0001", "port": 8080, "run_id": 1}).ip == "2001:db8::1"


@pytest.mark.parametrize(
    ("ip", "port", "run_id", "complaint"),
    [
        ("999.1.1.1", 8080, 1, "not an IPv4 or IPv6"),
        ("node.example.com", 8080, 1, "host names"),
        ("", 8080, 1, "not an IPv4"),
        ("10.0.0.1:80", 8080, 1, "not an IPv4"),
        ("0.0.0.0", 8080, 1, "unspecified"),
        ("::", 8080, 1, "unspecified"),
        ("224.0.0.1", 8080, 1, "multicast"),
        ("fe80::1%eth0", 8080, 1, "zone"),
        (167772161, 8080, 1, "ip: Must be a string"),
        (None, 8080, 1, "ip: Must be a string"),
        ("10.0.0.1", 0, 1, "^port:"),
        ("10.0.0.1", 70000, 1, "^port:"),
        ("10.0.0.1", -1, 1, "^port:"),
        ("10.0.0.1", "8080", 1, "^port:"),
        ("10.0.0.1", 8080.0, 1, "^port:"),
        ("10.0.0.1", True, 1, "^port:"),
        ("10.0.0.1", 8080, -1, "^run_id:"),
        ("10.0.0.1", 8080, "1", "^run_id:"),
        ("10.0.0.1", 8080, False, "^run_id:"),
        ("10.0.0.1", 8080, None, "^run_id:"),
        ("10.0.0.1", 8080, 2**63, "^run_id:"),
    ],
)
def test_bad_announcements_are_refused_with_the_reason(ip: Any, port: Any, run_id: Any, complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        Announcement.from_json({"ip": ip, "port": port, "run_id": run_id})


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="^extra:"):
        Announcement.from_json({"ip": "10.0.0.1", "port": 1, "run_id": 0, "extra": 1})


def test_addresses_are_checksummed_and_bad_ones_refused() -> None:
    lower = "0x" + "ab" * 20
    checksummed = parse_address(lower)
    assert checksummed is not None and checksummed.lower() == lower and checksummed != lower
    assert parse_address(checksummed) == checksummed
    assert parse_address("0x1234") is None
    assert parse_address("not-an-address") is None
    assert parse_address("0x" + "zz" * 20) is None
    # mixed case with a wrong checksum is a typo, not an address
    wrong_case = checksummed[:2] + checksummed[2:].swapcase()
    assert parse_address(wrong_case) is None


def test_run_ids_must_be_plain_decimal_integers() -> None:
    assert parse_run_id("0") == 0
    assert parse_run_id("42") == 42
    assert parse_run_id(str(2**63 - 1)) == 2**63 - 1
    for bad in ("-1", "1.5", "abc", "", "+3", " 3", "１", str(2**63), str(2**256)):
        assert parse_run_id(bad) is None, bad
