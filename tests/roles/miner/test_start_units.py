"""Pure pieces of the miner's start-up: stake parsing, the run check, the registration
decision, the announced address, the status watch's outcome and the state file."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from prime.chain.types import NodeInfo, NodeStatus, Requirements, RunInfo, Specs
from prime.errors import PrimeError
from prime.roles.miner.announce import Announcer, choose_announce_ip, outbound_ip
from prime.roles.miner.registration import check_run, decide_registration, parse_stake
from prime.roles.miner.state import Announcement, MinerState, StateFile, Verdict
from prime.roles.miner.watch import describe, outcome

NODE = "0x" + "11" * 20
SPECS = Specs(gpu_count=0, gpu_model="", gpu_memory_mib=0, cpu_cores=2, ram_mib=8192, disk_gib=50)


def _info(status: NodeStatus, run_id: int = 1, stake: int = 10**16, report: bytes = b"\x00" * 32) -> NodeInfo:
    return NodeInfo(NODE, "0x" + "22" * 20, run_id, SPECS, stake, status, report)


@pytest.mark.parametrize(
    ("text", "wei"),
    [(None, None), ("", None), ("12345", 12345), ("0.01eth", 10**16), ("2 gwei", 2 * 10**9), ("1_000wei", 1000), ("1ETH", 10**18)],
)
def test_parse_stake(text, wei) -> None:
    assert parse_stake(text) == wei


@pytest.mark.parametrize("text", ["lots", "-1", "0.5", "1e-30eth", "eth"])
def test_parse_stake_refuses_non_amounts(text) -> None:
    with pytest.raises(PrimeError) as err:
        parse_stake(text)
    assert "--stake" in err.value.message


def test_check_run_names_the_failing_requirement_in_one_sentence() -> None:
    run = RunInfo(7, "0x" + "33" * 20, Requirements(min_cpu_cores=64), "http://d")
    with pytest.raises(PrimeError) as err:
        check_run(run, SPECS)
    assert "2 CPU cores" in err.value.message and "64" in err.value.message and "run 7" in err.value.message
    assert err.value.message.count(".") <= 1  # one sentence
    check_run(RunInfo(7, "0x" + "33" * 20, Requirements(min_cpu_cores=2), "http://d"), SPECS)
    with pytest.raises(PrimeError, match="has ended"):
        check_run(RunInfo(7, "0x" + "33" * 20, Requirements(), "http://d", ended=True), SPECS)


def test_a_node_the_validators_would_refuse_is_told_before_it_stakes() -> None:
    run = RunInfo(7, "0x" + "33" * 20, Requirements(), "http://d")
    few_cores = Specs(gpu_count=8, gpu_model="NVIDIA H100 PCIe", gpu_memory_mib=81559, cpu_cores=16, ram_mib=1 << 20,
                      disk_gib=500)
    with pytest.raises(PrimeError) as err:
        check_run(run, few_cores)
    assert "16 CPU cores" in err.value.message and "--gpu" in err.value.message
    small_ram = Specs(gpu_count=0, gpu_model="", gpu_memory_mib=0, cpu_cores=64, ram_mib=1024, disk_gib=50)
    with pytest.raises(PrimeError, match="1024 MiB of RAM"):
        check_run(run, small_ram)
    check_run(run, Specs(gpu_count=8, gpu_model="NVIDIA H100 PCIe", gpu_memory_mib=81559, cpu_cores=64,
                         ram_mib=1 << 20, disk_gib=500))
    # a model only a validator's --gpu-classes file may know is left to the validators
    check_run(run, Specs(gpu_count=1, gpu_model="RTX 9090", gpu_memory_mib=65536, cpu_cores=1, ram_mib=1024, disk_gib=5))


def test_registration_decision() -> None:
    assert decide_registration(_info(NodeStatus.NONE, run_id=0), 1).register
    for status in (NodeStatus.REGISTERED, NodeStatus.APPROVED, NodeStatus.ACTIVE):
        same = decide_registration(_info(status), 1)
        assert not same.register and same.refusal is None
        other = decide_registration(_info(status, run_id=2), 1)
        assert not other.register and "run 2" in other.refusal and "--run-id 2" in other.refusal
    assert decide_registration(_info(NodeStatus.LEFT, stake=0), 1).register
    assert decide_registration(_info(NodeStatus.REJECTED, stake=0), 1).register
    assert "rejected" in decide_registration(_info(NodeStatus.REJECTED), 1).refusal
    assert "withdraw" in decide_registration(_info(NodeStatus.LEFT, run_id=3), 1).refusal
    # An ejected node, or one whose run ended, comes back by itself: withdraw, then register again.
    for status in (NodeStatus.EJECTED, NodeStatus.RELEASED):
        back = decide_registration(_info(status, run_id=3), 1)
        assert back.register and back.withdraw_first and back.refusal is None
        assert not decide_registration(_info(status, stake=0), 1).withdraw_first


def test_announce_ip_choice() -> None:
    assert choose_announce_ip("203.0.113.9", "0.0.0.0", "http://d:1") == "203.0.113.9"
    assert choose_announce_ip(" ::1 ", "0.0.0.0", "http://d:1") == "::1"
    assert choose_announce_ip(None, "127.0.0.1", "http://d:1") == "127.0.0.1"  # one specific listen address
    for bad in ("example.com", "0.0.0.0", "1.2.3"):
        with pytest.raises(PrimeError, match="--public-ip"):
            choose_announce_ip(bad, "0.0.0.0", "http://d:1")
    # Listening everywhere: the interface that routes to discovery (loopback here), without sending anything.
    assert choose_announce_ip(None, "0.0.0.0", "http://127.0.0.1:9") == "127.0.0.1"
    assert outbound_ip("127.0.0.1") == "127.0.0.1"


def test_outbound_ip_sends_no_packet() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(0.2)
        assert outbound_ip("127.0.0.1", receiver.getsockname()[1]) == "127.0.0.1"
        with pytest.raises(TimeoutError):
            receiver.recv(16)


async def test_announcer_announces_on_change_and_periodically() -> None:
    now = [0.0]
    ip = ["10.0.0.1"]
    sent: list[tuple[str, int]] = []

    async def announce(address: str, port: int) -> None:
        sent.append((address, port))

    announcer = Announcer(announce, lambda: ip[0], 8070, every_s=60, clock=lambda: now[0])
    assert await announcer.step() and sent == [("10.0.0.1", 8070)]
    now[0] = 30
    assert not await announcer.step()
    ip[0] = "10.0.0.2"  # the address changed: at once
    assert await announcer.step() and sent[-1] == ("10.0.0.2", 8070)
    now[0] = 95
    assert await announcer.step() and len(sent) == 3  # 60 s passed


async def test_announcer_retries_after_a_failure() -> None:
    calls = []

    async def announce(address: str, port: int) -> None:
        calls.append(address)
        if len(calls) == 1:
            raise PrimeError("discovery is down")

    announcer = Announcer(announce, lambda: "10.0.0.1", 1, every_s=60)
    with pytest.raises(PrimeError):
        await announcer.step()
    assert await announcer.step() and len(calls) == 2


def test_watch_outcome() -> None:
    state = MinerState()
    assert outcome(_info(NodeStatus.REGISTERED), 1, state, verdict_wait_over=True) is None
    assert outcome(_info(NodeStatus.ACTIVE), 1, state, verdict_wait_over=True) is None
    # Rejected: wait a moment for the validator's verdict, then stop with the chain's word.
    assert outcome(_info(NodeStatus.REJECTED), 1, state, verdict_wait_over=False) is None
    plain = outcome(_info(NodeStatus.REJECTED, report=b"\x07" * 32), 1, state, verdict_wait_over=True)
    assert "rejected" in plain.message and "0x" + "07" * 32 in plain.message and "no validator sent a reason" in plain.message
    state.verdict = Verdict(False, "too slow for 8 GPUs", "0x" + "07" * 32, "0x" + "44" * 20, "c1", 0.0)
    told = outcome(_info(NodeStatus.REJECTED, report=b"\x07" * 32), 1, state, verdict_wait_over=False)
    assert "too slow for 8 GPUs" in told.message and "0x" + "44" * 20 in told.message
    assert "ejected" in outcome(_info(NodeStatus.EJECTED), 1, state, verdict_wait_over=True).message
    assert "left" in outcome(_info(NodeStatus.LEFT), 1, state, verdict_wait_over=True).message
    assert "--run-id 2" in outcome(_info(NodeStatus.ACTIVE, run_id=2), 1, state, verdict_wait_over=True).message
    assert "invite" in describe(_info(NodeStatus.APPROVED), 1, state)
    state.master_url = "http://m:1"
    assert "http://m:1" in describe(_info(NodeStatus.ACTIVE), 1, state)


def test_state_file_round_trip_and_damage(tmp_path: Path) -> None:
    store = StateFile(tmp_path)
    assert store.load() == MinerState()
    state = MinerState(node=NODE, run_id=3, master_url="http://m:1", announced=Announcement("1.2.3.4", 80, "http://d", 5.0),
                       verdict=Verdict(True, "ok", "0x" + "00" * 32, NODE, "c", 1.0), tasks=[{"id": "t", "replica": 0, "state": "Running"}])
    store.save(state)
    assert store.load() == state
    assert oct(store.path.stat().st_mode & 0o777) != "0o777"
    # Another run or node: the old facts do not carry over.
    loaded = store.load()
    loaded.reset_for(NODE, 4)
    assert loaded.master_url is None and loaded.run_id == 4
    store.path.write_text("{not json")
    assert store.load() == MinerState()
    assert list(tmp_path.glob("miner-state.json.damaged-*"))
    store.path.write_text(json.dumps({"run_id": 2, "announced": "garbage", "unknown": 1}))
    assert store.load() == MinerState(run_id=2)
