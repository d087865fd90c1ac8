"""Group tasks (issue 15) at a real ``prime master start`` process: a SIGKILLed master goes on with
the same attempt, lying reports change nothing, groups compete for nodes without blocking ordinary
tasks, and a group stopped in its restart backoff never starts again.

Real anvil, discovery and master; the nodes are fake miners (real keys, joinRun and signed
heartbeats, no containers) offering ``task_ports`` and reporting what they are told to run as
Running (``run_desired``). The master beats every 1 s; a group's first restart goes out at once, a
second one waits its backoff (5 s)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest_asyncio

from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import FakeMiner, World, eventually, make_world, signed_call

BEAT_S = 0.3
BACKOFF_S = 5.0  # GroupRequest.restart_backoff_s: the wait before a second restart (the first has none)
PORTS_BASE = 43_000  # numbers only: a FakeMiner binds none of them


@pytest_asyncio.fixture(loop_scope="session")
async def world(anvil, deployment, role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, role_processes, tmp_path_factory.mktemp("groups"))
    yield w
    await w.close()


async def start_nodes(world: World, anvil: Any, ported: int, plain: int = 0) -> list[FakeMiner]:
    """``ported`` nodes offering task ports, then ``plain`` ones without, all Healthy."""
    miners = []
    for i in range(ported + plain):
        miner = await world.new_miner(anvil=anvil)  # 2 GPUs
        if i < ported:
            miner.task_ports = (PORTS_BASE + 10 * i, PORTS_BASE + 10 * i + 9)
        miner.run_desired = True
        miner.start_heartbeats(BEAT_S)
        miners.append(miner)

    async def healthy() -> bool:
        nodes = await world.nodes()
        return all(nodes.get(m.address, {}).get("state") == "Healthy" for m in miners)

    await eventually(healthy, timeout_s=60, what="every node Healthy")
    await asyncio.sleep(BEAT_S * 2)  # a heartbeat with task_ports from each since it became Healthy
    return miners


async def call(world: World, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return await signed_call(world.owner, method, world.url, path, json.dumps(body).encode() if body is not None else b"")


async def view(world: World, task_id: str) -> dict[str, Any]:
    status, task = await call(world, "GET", f"/tasks/{task_id}")
    assert status == 200, task
    return task


async def create(world: World, spec: dict[str, Any]) -> str:
    status, task = await call(world, "POST", "/tasks", spec)
    assert status == 201, task
    return str(task["id"])


def group_spec(nodes: int) -> dict[str, Any]:
    return {"image": "busybox", "command": ["torchrun", "train.py"], "gpus": 1, "group": {"nodes": nodes}}


async def phase(world: World, task_id: str, wanted: str, attempt: int, timeout_s: float = 30) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        task = await view(world, task_id)
        return task if (task["group"]["phase"], task["group"]["attempt"]) == (wanted, attempt) else None

    return await eventually(check, timeout_s=timeout_s, what=f"group {task_id} {wanted} (attempt {attempt})")


def entry(miner: FakeMiner, task_id: str, replica: int) -> dict[str, Any] | None:
    answer = miner.last_answer or {}
    return next((d for d in answer.get("desired", []) if (d["id"], d["replica"]) == (task_id, replica)), None)


def of_task(miner: FakeMiner, task_id: str) -> list[dict[str, Any]]:
    return [d for d in (miner.last_answer or {}).get("desired", []) if d["id"] == task_id]


async def member_entries(miners: list[FakeMiner], task: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Each member's desired entry at its node, checked against the group's view (env, ports, attempt)."""
    by_node = {m.address: m for m in miners}
    group, tid = task["group"], task["id"]
    members, attempt = group["members"], group["attempt"]
    k = len(members)
    assert [m["rank"] for m in members] == list(range(k))
    assert len({m["node"] for m in members}) == k, members  # one member a node

    async def entries() -> dict[int, dict[str, Any]] | None:
        found = {m["rank"]: entry(by_node[m["node"]], tid, m["rank"]) for m in members}
        return found if all(e is not None and e["attempt"] == attempt for e in found.values()) else None

    found = await eventually(entries, timeout_s=10, what=f"every member of {tid} in its node's answer")
    rank0 = members[0]
    for m in members:
        miner, e = by_node[m["node"]], found[m["rank"]]
        assert miner.task_ports is not None, "a member on a node without task ports"
        env = e["env"]
        assert (env["NODE_RANK"], env["NNODES"], env["PRIME_GROUP_ATTEMPT"], env["PRIME_GROUP_ID"]) == (
            str(m["rank"]), str(k), str(attempt), tid), env
        assert env["MASTER_ADDR"] == rank0["address"] == "127.0.0.1" and env["MASTER_PORT"] == str(rank0["rendezvous_port"])
        assert e["ports"] == [m["rendezvous_port"], m["peer_port"]], (e["ports"], m)
        assert all(miner.task_ports[0] <= p <= miner.task_ports[1] for p in e["ports"])
        replica = task["replicas"][m["rank"]]
        assert (replica["node"], replica["attempt"]) == (m["node"], attempt), replica
        # nothing else of the task on that node
        assert [d["replica"] for d in of_task(miner, tid)] == [m["rank"]]
    for miner in miners:
        if miner.address not in {m["node"] for m in members}:
            assert of_task(miner, tid) == [], f"{miner.address} hosts no member of {tid}"
    return found


def shape(task: dict[str, Any]) -> dict[str, Any]:
    """What must not change: the group and the replicas' state, node and attempt."""
    return {"state": task["state"], "group": task["group"],
            "replicas": [(r["index"], r["state"], r["node"], r["attempt"], r["exit_code"]) for r in task["replicas"]]}


def starts_of(miners: list[FakeMiner], task_id: str) -> list[tuple[str, int, int]]:
    return sorted((m.address, s["replica"], s["attempt"]) for m in miners for s in m.received.starts if s["id"] == task_id)


def desired_ever(miners: list[FakeMiner], task_id: str) -> set[tuple[str, int, int]]:
    return {(m.address, r, a) for m in miners for (t, r, a) in m.desired_ever if t == task_id}


async def fresh_answers(miners: list[FakeMiner]) -> None:
    """Wait until every node has an answer of the master's from now on."""
    for m in miners:
        m.last_answer = None
    await eventually(lambda: _all_answered(miners), timeout_s=30, what="a fresh heartbeat answer at every node")


async def _all_answered(miners: list[FakeMiner]) -> bool:
    return all(m.last_answer is not None for m in miners)


async def running_group(world: World, miners: list[FakeMiner], nodes: int) -> tuple[str, dict[str, Any]]:
    tid = await create(world, group_spec(nodes))
    task = await phase(world, tid, "Running", 0)
    assert task["state"] == "Running" and task["group"]["restarts"] == 0
    assert all(r["state"] == "Running" for r in task["replicas"]), task["replicas"]
    await member_entries(miners, task)
    return tid, task


# --- 1. the master is SIGKILLed and started again -------------------------------------------------


async def test_a_killed_master_goes_on_with_the_same_attempt_then_restarts_the_group(world: World, anvil) -> None:
    miners = await start_nodes(world, anvil, ported=3)
    tid, before = await running_group(world, miners, 2)
    entries_before = await member_entries(miners, before)
    starts_before = starts_of(miners, tid)

    world.master.kill()
    await asyncio.sleep(1.5)  # heartbeats fail meanwhile
    await world.master.start_async()
    await fresh_answers(miners)
    await asyncio.sleep(3)  # a few heartbeats of the new process (a gap in its view, then judged again)

    after = await view(world, tid)
    assert shape(after) == shape(before), (before, after)
    assert await member_entries(miners, after) == entries_before  # env, ports, attempt, spec: all the same
    assert {a for (_, _, a) in desired_ever(miners, tid)} == {0}, "no new attempt"
    assert all(a == 0 for (_, _, a) in starts_of(miners, tid)) and len(starts_of(miners, tid)) >= len(starts_before)
    assert "attempt 1" not in world.master.logs()

    # One member exits 1: the group restarts as attempt 1 (the first restart: no backoff), ranks kept on their nodes.
    failing = next(m for m in miners if m.address == before["group"]["members"][1]["node"])
    failing.report(tid, 1, "Failed", exit_code=1, attempt=0)
    await eventually(lambda: _attempt_at_least(world, tid, 1), timeout_s=10, what="attempt 1")
    again = await phase(world, tid, "Running", 1)
    assert again["group"]["restarts"] == 1 and again["state"] == "Running"
    assert "rank 1" in again["group"]["reason"] and "exited with code 1" in again["group"]["reason"]
    assert "group attempt 0: Running -> Restarting" in world.master.logs()
    assert [(m["rank"], m["node"]) for m in again["group"]["members"]] == [
        (m["rank"], m["node"]) for m in before["group"]["members"]]  # survivors keep their ranks
    new = await member_entries(miners, again)
    assert all(e["env"]["PRIME_GROUP_ATTEMPT"] == "1" for e in new.values())
    assert all(e["ports"] == entries_before[rank]["ports"] for rank, e in new.items())


async def _attempt_at_least(world: World, task_id: str, attempt: int) -> bool:
    return (await view(world, task_id))["group"]["attempt"] >= attempt


# --- 2. lying nodes ---------------------------------------------------------------------------------


async def test_lying_reports_change_nothing(world: World, anvil) -> None:
    miners = await start_nodes(world, anvil, ported=3)
    tid, before = await running_group(world, miners, 2)
    entries_before = await member_entries(miners, before)
    starts_before = starts_of(miners, tid)
    nodes = [m["node"] for m in before["group"]["members"]]
    a, b = (next(m for m in miners if m.address == n) for n in nodes)
    c = next(m for m in miners if m.address not in nodes)
    errors_before = [len(m.heartbeat_errors) for m in miners]

    def rep(replica: int, state: str, exit_code: int | None = None, attempt: int = 0) -> dict[str, Any]:
        return {"id": tid, "replica": replica, "state": state, "exit_code": exit_code, "attempt": attempt}

    honest_a, honest_b = rep(0, "Running"), rep(1, "Running")
    lies: list[tuple[str, FakeMiner, list[dict[str, Any]]]] = [
        ("rank 0's node reports rank 1 (not its own) Failed", a, [honest_a, rep(1, "Failed", 1)]),
        ("rank 0's node reports rank 1 (not its own) Completed", a, [honest_a, rep(1, "Completed", 0)]),
        ("rank 0's node reports a rank past the group", a, [honest_a, rep(5, "Failed", 1)]),
        ("its own rank Failed in an attempt that does not exist", a, [rep(0, "Failed", 1, attempt=7)]),
        ("its own rank Failed in the next attempt", a, [rep(0, "Failed", 1, attempt=1)]),
        ("rank 1's node reports rank 0 (another node's) Failed", b, [honest_b, rep(0, "Failed", 1)]),
        ("a node outside the group reports both ranks Running", c, [rep(0, "Running"), rep(1, "Running")]),
        ("a node outside the group reports rank 1 Failed", c, [rep(1, "Failed", 1)]),
        ("a node outside the group reports rank 1 Completed", c, [rep(1, "Completed", 0)]),
    ]
    for what, liar, tasks in lies:
        for _ in range(2):
            status, answer = await liar.heartbeat(tasks=tasks)
            assert status == 200, (what, status, answer)  # well-formed, signed: answered, and ignored
            assert shape(await view(world, tid)) == shape(before), what
        assert of_task(c, tid) == [], what

    await asyncio.sleep(2)  # honest heartbeats go on: nothing comes of the lies later either
    status, health = await signed_call(None, "GET", world.url, "/health")
    assert status == 200, health
    after = await view(world, tid)
    assert shape(after) == shape(before), (before, after)
    assert await member_entries(miners, after) == entries_before
    assert starts_of(miners, tid) == starts_before
    assert not any(n == c.address for (n, _, _) in desired_ever(miners, tid))
    assert [m.heartbeat_errors[n:] for m, n in zip(miners, errors_before)] == [[]] * len(miners)  # honest beats go on

    # No lie was kept where the view does not show it: rank 1 is not done though two nodes said so.
    a.report(tid, 0, "Completed", exit_code=0, attempt=0)
    await eventually(lambda: _replica_is(world, tid, 0, "Completed"), timeout_s=10, what="rank 0 Completed")
    await asyncio.sleep(1)
    task = await view(world, tid)
    assert (task["group"]["phase"], task["replicas"][1]["state"]) == ("Running", "Running"), task
    b.report(tid, 1, "Completed", exit_code=0, attempt=0)
    assert (await phase(world, tid, "Completed", 0))["state"] == "Completed"


async def _replica_is(world: World, task_id: str, replica: int, state: str) -> bool:
    return (await view(world, task_id))["replicas"][replica]["state"] == state


async def _stopped_at(miner: FakeMiner, task_id: str) -> bool:
    return task_id in miner.received.stops


# --- 3. competition ----------------------------------------------------------------------------------


async def test_groups_compete_for_nodes_and_never_block_ordinary_tasks(world: World, anvil) -> None:
    miners = await start_nodes(world, anvil, ported=3, plain=1)
    plain = miners[3]
    group_a, a = await running_group(world, miners, 2)
    a_nodes = {m["node"] for m in a["group"]["members"]}
    assert plain.address not in a_nodes

    group_b = await create(world, group_spec(2))  # one node with ports is left: B waits
    ordinary = await create(world, {"image": "busybox", "command": ["sleep", "60"], "gpus": 2})

    async def ordinary_running() -> dict[str, Any] | None:
        task = await view(world, ordinary)
        return task if task["state"] == "Running" else None

    placed = await eventually(ordinary_running, timeout_s=15, what="the ordinary task Running")
    assert placed["replicas"][0]["node"] not in a_nodes  # 2 GPUs: on a node free of members
    await asyncio.sleep(2)  # several scheduling rounds
    b = await view(world, group_b)
    assert (b["state"], b["group"]["phase"], b["group"]["attempt"], b["group"]["members"]) == ("Pending", "Pending", -1, [])
    assert all((r["state"], r["node"]) == ("Pending", None) for r in b["replicas"]), b["replicas"]
    assert desired_ever(miners, group_b) == set() and starts_of(miners, group_b) == []
    assert shape(await view(world, group_a)) == shape(a)

    for m in a["group"]["members"]:  # A's members end well
        next(x for x in miners if x.address == m["node"]).report(group_a, m["rank"], "Completed", exit_code=0, attempt=0)
    done = await phase(world, group_a, "Completed", 0)
    assert done["state"] == "Completed" and all(r["state"] == "Completed" for r in done["replicas"])

    b = await phase(world, group_b, "Running", 0)
    assert b["state"] == "Running" and plain.address not in {m["node"] for m in b["group"]["members"]}
    await member_entries(miners, b)
    await fresh_answers(miners)
    assert all(of_task(m, group_a) == [] for m in miners)
    assert (await view(world, ordinary))["state"] == "Running"
    for group in (group_a, group_b):
        assert not any(n == plain.address for (n, _, _) in desired_ever(miners, group))
        assert not any(n == plain.address for (n, _, _) in starts_of(miners, group))


# --- 4. stopped while restarting ------------------------------------------------------------------


async def test_a_group_stopped_in_its_restart_backoff_stays_stopped(world: World, anvil) -> None:
    miners = await start_nodes(world, anvil, ported=2)
    tid, before = await running_group(world, miners, 2)
    failing, other = (next(m for m in miners if m.address == n["node"]) for n in before["group"]["members"])
    failing.report(tid, 0, "Failed", exit_code=1, attempt=0)  # the first restart goes out at once...
    await phase(world, tid, "Running", 1)
    failed_at = time.monotonic()
    failing.report(tid, 0, "Failed", exit_code=1, attempt=1)  # ...the second waits its backoff
    await phase(world, tid, "Restarting", 1, timeout_s=10)
    await eventually(lambda: _stopped_at(other, tid), timeout_s=5, what="the other member's node told to stop")
    assert time.monotonic() - failed_at < BACKOFF_S - 1, "too slow to stop it within the backoff"

    status, body = await call(world, "DELETE", f"/tasks/{tid}")
    assert status in (200, 202), body

    async def stopped() -> dict[str, Any] | None:
        task = await view(world, tid)
        return task if task["state"] == "Stopped" else None

    await eventually(stopped, timeout_s=10, what="the task Stopped")
    await asyncio.sleep(max(0.0, failed_at + BACKOFF_S + 2 - time.monotonic()))  # past the backoff
    await fresh_answers(miners)
    task = await view(world, tid)
    assert task["state"] == "Stopped" and task["stop_requested"], task
    # the stop ends the group (Stopped, still attempt 1): no attempt after the backoff
    assert task["group"]["attempt"] == 1 and task["group"]["phase"] == "Stopped", task["group"]
    assert all(r["state"] == "Stopped" and r["node"] is None for r in task["replicas"]), task["replicas"]
    assert all(of_task(m, tid) == [] for m in miners)
    assert {a for (_, _, a) in desired_ever(miners, tid)} == {0, 1} and {a for (_, _, a) in starts_of(miners, tid)} == {0, 1}
    assert "group attempt 2" not in world.master.logs()
