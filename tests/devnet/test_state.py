"""devnet.json, the env file, dev keystores, port choice and log tailing."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from prime.chain.anvil import dev_accounts, free_port
from prime.devnet.keys import DEV_ROLES, ROLES, dev_account, ensure_dev_keys
from prime.devnet.logs import log_names, show_logs
from prime.devnet.state import DevnetInfo, DevnetPaths, Service, env_file_text, require_info
from prime.devnet.up import DEFAULT_PORTS, choose_ports
from prime.errors import PrimeError
from prime.keys import create_keystore, load_account


@pytest.fixture
def paths(tmp_path):
    return DevnetPaths.at(tmp_path / "dn")


def sample_info(paths: DevnetPaths) -> DevnetInfo:
    keys = {role: {"address": dev_account(role).address, "key_file": str(paths.key(role))} for role in DEV_ROLES}
    keys["node"] = {"address": "0x" + "ab" * 20, "key_file": str(paths.key("node"))}
    services = {name: Service(port, f"http://127.0.0.1:{port}", skipped=name == "validator") for name, port in DEFAULT_PORTS.items()}
    return DevnetInfo(
        state_dir=str(paths.root), rpc_url="http://127.0.0.1:8545", chain_id=31337, registry="0x" + "12" * 20,
        deployment=str(paths.deployment), run_id=3, keys=keys, services=services, node_address=keys["node"]["address"],
        commands={"master": ["prime", "master", "start"]},
    )


def test_devnet_json_round_trip_and_env_file(paths):
    with pytest.raises(PrimeError, match="prime devnet up"):
        require_info(paths)
    info = sample_info(paths)
    info.save(paths)
    loaded = DevnetInfo.load(paths)
    assert loaded == info and loaded.services["validator"].skipped
    text = env_file_text(info)
    assert "export PRIME_MASTER_URL=http://127.0.0.1:8092\n" in text
    assert f"export PRIME_KEY_FILE={paths.key('owner')}\n" in text
    assert "export PRIME_KEY_PASSWORD=devnet\n" in text

    paths.info.write_text("{not json")
    with pytest.raises(PrimeError, match="remove the directory"):
        DevnetInfo.load(paths)


def test_dev_keys_are_keystores_of_anvils_accounts_and_are_reused(paths):
    keys = ensure_dev_keys(paths)
    assert set(keys) == set(ROLES) == {*DEV_ROLES, "node"}
    for role, key in keys.items():
        expected = key.address if role == "node" else dev_account(role).address
        assert load_account(key.key_file, password="devnet").address == expected
    before = {role: paths.key(role).read_bytes() for role in ROLES}
    again = ensure_dev_keys(paths)
    assert {role: paths.key(role).read_bytes() for role in ROLES} == before  # not rewritten
    assert again["node"].address == keys["node"].address  # the node key is kept too

    paths.key("master").unlink()
    paths.key("owner").rename(paths.key("master"))  # the wrong key under a role's name
    with pytest.raises(PrimeError, match="not the devnet's master key"):
        ensure_dev_keys(paths)


def test_each_state_dir_gets_its_own_node_key(tmp_path):
    """Two local networks on one engine never share a node identity (nor its containers, issue 13)."""
    one, two = ensure_dev_keys(DevnetPaths.at(tmp_path / "one")), ensure_dev_keys(DevnetPaths.at(tmp_path / "two"))
    assert one["node"].address != two["node"].address
    anvils = {account.address for account in dev_accounts(10)}
    assert one["node"].address not in anvils and two["node"].address not in anvils
    assert one["owner"].address == two["owner"].address == dev_account("owner").address  # the shared, funded ones

    # An older state dir holding anvil's shared node key (account 5) gets its own key instead.
    old = DevnetPaths.at(tmp_path / "old")
    old.keys.mkdir(parents=True, exist_ok=True)
    create_keystore(old.key("node"), "devnet", dev_accounts(10)[5].key.hex(), kdf="scrypt", iterations=2**4)
    assert ensure_dev_keys(old)["node"].address not in anvils


def test_ports_explicit_default_or_free():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    try:
        with pytest.raises(PrimeError, match=f"Port {taken} for the devnet's master is in use"):
            choose_ports({"master": taken}, ["master"])
        explicit = free_port()
        chosen, moved = choose_ports({"anvil": explicit}, ["anvil", "discovery"])
        assert chosen["anvil"] == explicit and "anvil" not in moved
        assert len(set(chosen.values())) == 2
    finally:
        busy.close()


def test_logs_tail_and_follow(paths):
    paths.logs.mkdir(parents=True)
    paths.log("master").write_text("m1\nm2\nm3\n")
    paths.log("anvil").write_text("a1\n")
    assert log_names(paths, None) == ["anvil", "master"]
    with pytest.raises(PrimeError, match="not a devnet process"):
        log_names(paths, "nginx")
    with pytest.raises(PrimeError, match="has no log"):
        log_names(paths, "miner")

    out: list[str] = []
    show_logs(paths, ["master"], tail=2, emit=out.append)
    assert out == ["m2", "m3"]

    out.clear()
    stop = threading.Event()

    def write_later() -> None:
        time.sleep(0.2)
        with open(paths.log("master"), "a") as fh:
            fh.write("m4\npart")
            fh.flush()
            time.sleep(0.2)
            fh.write("ial\n")
        time.sleep(0.3)
        stop.set()

    threading.Thread(target=write_later).start()
    show_logs(paths, ["anvil", "master"], tail=1, follow=True, emit=out.append, poll_s=0.05, stop=stop.is_set)
    assert out == ["anvil  | a1", "master | m3", "master | m4", "master | partial"]


def test_the_devnet_miner_passes_task_ports_on(paths):
    from prime.devnet.up import miner_command

    info = sample_info(paths)
    plain = miner_command(info, paths)
    assert "--task-ports" not in plain
    ported = miner_command(info, paths, task_ports="29500-29509")
    assert ported[ported.index("--task-ports") + 1] == "29500-29509" and ported[: len(plain)] == plain
