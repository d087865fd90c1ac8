"""One GPU UUID on one active node (issue 12): the pure rule, the store's records, and the guard
against a fake chain (a node's status is read at decision time)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

from prime.chain.types import NodeStatus, Specs
from prime.challenge.params import plan_challenge
from prime.challenge.runner import build_report
from prime.roles.validator.store import Registration, ValidatorStore
from prime.roles.validator.uniqueness import UuidGuard
from prime.roles.validator.verdict import GPU_UUID, Verdict, from_challenge, gpu_uuid_problem
from prime.store import Database

U1 = "GPU-11111111-1111-1111-1111-111111111111"
U2 = "GPU-22222222-2222-2222-2222-222222222222"
A, B, C = "0x" + "a" * 40, "0x" + "b" * 40, "0x" + "c" * 40
ONE_H100 = Specs(gpu_count=1, gpu_model="NVIDIA H100 80GB HBM3", gpu_memory_mib=81559, cpu_cores=8, ram_mib=65536,
                 disk_gib=100)


def test_the_rule_only_holds_reports_that_name_uuids() -> None:
    assert gpu_uuid_problem([], 8, {U1: B}) is None  # a CPU node, or a miner that names none
    assert gpu_uuid_problem([U1], 1, {}) is None
    assert gpu_uuid_problem([U1, U2], 2, {"GPU-other": B}) is None


def test_repeated_uuids_a_wrong_count_and_a_held_uuid_are_refused_each_with_its_reason() -> None:
    assert "names GPU " + U1 + " twice" in (gpu_uuid_problem([U1, U1], 2, {}) or "")
    assert "names 1 GPU UUID(s) but the node claims 2" in (gpu_uuid_problem([U1], 2, {}) or "")
    assert "claims 0" in (gpu_uuid_problem([U1], 0, {}) or "")  # a CPU claim naming a GPU
    problem = gpu_uuid_problem([U2, U1], 2, {U1: B})
    assert problem is not None and U1 in problem and B in problem and "one active node only" in problem


def report(uuids: list[str], *, approved: bool = True):
    plan = plan_challenge(ONE_H100, {"n": 64})
    checks = {"response": None, "merkle": None, "entries": None, "time": None if approved else "too slow"}
    out = build_report(plan, checks=checks, elapsed_s=0.01)
    out.gpu_uuids = list(uuids)
    return out


class FakeChain:
    def __init__(self) -> None:
        self.status: dict[str, NodeStatus] = {}
        self.asked: list[str] = []

    async def get_node(self, node: str):
        self.asked.append(node)
        return SimpleNamespace(status=self.status.get(node, NodeStatus.NONE))


def setup(tmp_path: Path) -> tuple[ValidatorStore, FakeChain, UuidGuard, dict[str, object]]:
    store = ValidatorStore(Database(tmp_path / "v.sqlite"))
    regs = [Registration(node=n, run_id=1, block=10 + i, log_index=0, tx_hash=f"0x{i:064x}") for i, n in enumerate((A, B, C))]
    store.enqueue(regs, 20, now=0.0, deadline_s=60.0)
    chain = FakeChain()
    rows = {row.node: row for row in store.all()}
    return store, chain, UuidGuard(store, chain, clock=lambda: 5.0), rows  # type: ignore[return-value]


async def test_a_second_node_reporting_an_active_nodes_uuid_is_rejected_and_the_first_keeps_it(tmp_path: Path) -> None:
    store, chain, guard, rows = setup(tmp_path)
    first = await guard.check(rows[A], ONE_H100, report([U1]))  # type: ignore[arg-type]
    assert first.approved and first.checks[GPU_UUID] is None
    assert store.gpu_uuids_of(A) == [U1]
    # A's approval is not on chain yet (Registered, our row open): A holds U1 already.
    chain.status[A] = NodeStatus.REGISTERED
    second = from_challenge(await guard.check(rows[B], ONE_H100, report([U1])))  # type: ignore[arg-type]
    assert isinstance(second, Verdict) and not second.approved and second.check == GPU_UUID
    assert second.reason.startswith("gpu_uuid check failed: GPU " + U1) and A in second.reason
    assert second.report["gpu_uuids"] == [U1] and second.report["checks"][GPU_UUID] is not None
    assert store.gpu_uuids_of(B) == []  # a refused report records nothing
    for status in (NodeStatus.APPROVED, NodeStatus.ACTIVE):
        chain.status[A] = status
        assert not (await guard.check(rows[C], ONE_H100, report([U1]))).approved  # type: ignore[arg-type]


async def test_a_node_that_left_or_was_ejected_frees_its_uuids(tmp_path: Path) -> None:
    store, chain, guard, rows = setup(tmp_path)
    await guard.check(rows[A], ONE_H100, report([U1]))  # type: ignore[arg-type]
    store.decide(rows[A].id, from_challenge(report([U1])), now=1.0, miner_url=None)
    store.reported(rows[A].id, tx_hash="0x1", now=2.0)
    for status in (NodeStatus.LEFT, NodeStatus.EJECTED, NodeStatus.REJECTED, NodeStatus.REGISTERED):
        chain.status[A] = status  # REGISTERED with our row reported: it registered again, not approved yet
        assert (await guard.check(rows[B], ONE_H100, report([U1]))).approved, status  # type: ignore[arg-type]
    assert store.gpu_uuids_of(B) == [U1]


async def test_a_re_validation_of_the_same_node_does_not_conflict_with_itself(tmp_path: Path) -> None:
    store, chain, guard, rows = setup(tmp_path)
    chain.status[A] = NodeStatus.ACTIVE
    for _ in range(2):
        assert (await guard.check(rows[A], ONE_H100, report([U1]))).approved  # type: ignore[arg-type]
    assert store.gpu_uuids_of(A) == [U1] and chain.asked == []  # nobody else holds it: the chain is not asked
    two = dataclasses.replace(ONE_H100, gpu_count=2)
    assert (await guard.check(rows[A], two, report([U2, "GPU-33333333-3333-3333-3333-333333333333"]))).approved  # type: ignore[arg-type]
    assert store.gpu_uuids_of(A) == [U2, "GPU-33333333-3333-3333-3333-333333333333"]  # the set is replaced


async def test_a_failed_or_uuid_less_report_is_left_as_it_is(tmp_path: Path) -> None:
    store, chain, guard, rows = setup(tmp_path)
    failed = report([U1], approved=False)
    assert await guard.check(rows[A], ONE_H100, failed) is failed  # type: ignore[arg-type]
    plain = report([])
    assert await guard.check(rows[A], ONE_H100, plain) is plain  # type: ignore[arg-type]
    assert GPU_UUID not in plain.checks and store.gpu_uuids_of(A) == []
    wrong = await guard.check(rows[A], ONE_H100, report([U1, U2]))  # type: ignore[arg-type]
    assert not wrong.approved and "claims 1" in wrong.reason
