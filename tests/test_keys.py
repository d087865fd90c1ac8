"""prime.keys: keystore files and load_account (real eth-account encryption, cheap KDF for speed)."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
from eth_account import Account

from prime.errors import KeyError_, PrimeError
from prime.keys import create_keystore, load_account, permission_warning, read_keystore

FAST = {"kdf": "pbkdf2", "iterations": 2}
KEY = "0x" + "4c" * 32


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("PRIME_KEY_PASSWORD", "PRIME_PRIVATE_KEY", "MY_PW"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PRIME_HOME", str(tmp_path / "home"))


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_create_writes_0600_in_a_new_0700_dir_and_round_trips(tmp_path) -> None:
    path = tmp_path / "keys" / "node.json"
    address = create_keystore(path, "pw", **FAST)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert read_keystore(path)["address"].lower() == address[2:].lower()
    assert load_account(path, password="pw").address == address
    assert [p.name for p in path.parent.iterdir()] == ["node.json"]  # no temporary file left


def test_mode_is_0600_even_with_a_permissive_umask(tmp_path) -> None:
    old = os.umask(0)
    try:
        create_keystore(tmp_path / "k.json", "pw", **FAST)
    finally:
        os.umask(old)
    assert mode(tmp_path / "k.json") == 0o600


def test_never_overwrites(tmp_path) -> None:
    path = tmp_path / "k.json"
    create_keystore(path, "pw", **FAST)
    before = path.read_bytes()
    with pytest.raises(KeyError_, match="already exists"):
        create_keystore(path, "pw", **FAST)
    assert path.read_bytes() == before


def test_directory_target_names_the_file_after_the_address(tmp_path) -> None:
    address = create_keystore(tmp_path, "pw", KEY, **FAST)
    assert address == Account.from_key(KEY).address
    assert (tmp_path / f"{address}.json").is_file()


@pytest.mark.parametrize("bad", ["0x1234", "zz" * 32, "0x" + "00" * 32, ""])
def test_invalid_private_keys_are_refused(tmp_path, bad: str) -> None:
    with pytest.raises(KeyError_):
        create_keystore(tmp_path / "k.json", "pw", bad, **FAST)
    assert not (tmp_path / "k.json").exists()


def test_empty_password_is_refused(tmp_path) -> None:
    with pytest.raises(KeyError_, match="empty"):
        create_keystore(tmp_path / "k.json", "", **FAST)


def test_password_from_env_and_custom_env_name(tmp_path, monkeypatch) -> None:
    path = tmp_path / "k.json"
    address = create_keystore(path, "s3cret", **FAST)
    monkeypatch.setenv("PRIME_KEY_PASSWORD", "s3cret")
    assert load_account(path, prompt=False).address == address
    monkeypatch.delenv("PRIME_KEY_PASSWORD")
    monkeypatch.setenv("MY_PW", "s3cret")
    assert load_account(path, password_env="MY_PW", prompt=False).address == address


def test_no_password_without_prompt_is_one_sentence(tmp_path) -> None:
    path = tmp_path / "k.json"
    create_keystore(path, "pw", **FAST)
    with pytest.raises(KeyError_, match="set the environment variable PRIME_KEY_PASSWORD"):
        load_account(path, prompt=False)


def test_wrong_password_is_one_sentence(tmp_path) -> None:
    path = tmp_path / "k.json"
    create_keystore(path, "right", **FAST)
    with pytest.raises(KeyError_) as caught:
        load_account(path, password="wrong")
    assert caught.value.message == f"Wrong password for {path}; check PRIME_KEY_PASSWORD or type the password again."


def test_missing_unreadable_and_non_keystore_files(tmp_path) -> None:
    with pytest.raises(KeyError_, match="does not exist"):
        load_account(tmp_path / "nope.json", password="pw")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(KeyError_, match="not valid JSON"):
        load_account(tmp_path / "garbage.json", password="pw")
    (tmp_path / "other.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(KeyError_, match="not an encrypted keystore"):
        load_account(tmp_path / "other.json", password="pw")
    with pytest.raises(KeyError_, match="is a directory"):
        load_account(tmp_path, password="pw")


def test_loose_permissions_are_warned_about(tmp_path, caplog) -> None:
    path = tmp_path / "k.json"
    create_keystore(path, "pw", **FAST)
    assert permission_warning(path) is None
    os.chmod(path, 0o644)
    assert "chmod 600" in permission_warning(path)
    with caplog.at_level(logging.WARNING, logger="prime.keys"):
        load_account(path, password="pw")
    assert any("accessible by other users" in r.getMessage() for r in caplog.records)


def test_a_keystore_whose_clear_address_lies_is_refused(tmp_path) -> None:
    path = tmp_path / "k.json"
    create_keystore(path, "pw", **FAST)
    data = json.loads(path.read_text())
    data["address"] = "11" * 20
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(data))
    with pytest.raises(KeyError_, match="claims address"):
        load_account(forged, password="pw")


def test_raw_key_from_env_only_without_key_file(monkeypatch) -> None:
    with pytest.raises(PrimeError, match="--key-file"):
        load_account(None)
    monkeypatch.setenv("PRIME_PRIVATE_KEY", KEY)
    assert load_account(None).address == Account.from_key(KEY).address
    monkeypatch.setenv("PRIME_PRIVATE_KEY", "0xnope")
    with pytest.raises(KeyError_, match="PRIME_PRIVATE_KEY"):
        load_account(None)


def test_default_scrypt_keystore_round_trips(tmp_path) -> None:
    """The real default KDF once (about a second): what `prime keys new` writes."""
    path = tmp_path / "k.json"
    address = create_keystore(path, "pw")
    assert json.loads(path.read_text())["crypto"]["kdf"] == "scrypt"
    assert load_account(path, password="pw").address == address
