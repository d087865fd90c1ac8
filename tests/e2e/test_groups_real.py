"""Group tasks on real parts (issue 15 acceptance).

anvil, a discovery process, a `prime master start` process and three `prime miner start`
processes, each with its own node and provider keys, data directory and ``--task-ports`` range,
on one Docker engine; members run with host networking on loopback.

1. With two miners up, a group of 3 stays Pending (no member is placed) and fails at its start
   timeout with the reason; the same program as ``--nodes 2:3`` starts on the two.
2. A 2-node group (then the 2:3 one) is a rendezvous: rank 0 listens on MASTER_ADDR:MASTER_PORT, every rank
   connects and sends its NODE_RANK, rank 0 writes the ranks it saw to /data; the file is
   downloaded through the master and holds 0..NNODES-1; every member's log shows its WORLD_SIZE,
   NODE_IPS and PRIME_PEERS.
3. The third miner comes up. A persistent 2-node group writes a checkpoint per rank; once both are
   synced the miner of one member is killed with SIGKILL: the group restarts with attempt 1 on the
   survivor plus the third miner, each member finds its own rank's checkpoint in /data, and the
   task completes.
4. Throughout, the master's log shows no member of an attempt started while another member of the
   same attempt was unplaced.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import docker
import pytest

from prime.chain.types import Requirements
from tests.e2e.support import MinerProcess as Miner
from tests.e2e.support import Prime, node_containers, remove_containers
from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import World, eventually, make_world, signed_call
from tests.support.miner_env import free_port_range, miner_env, write_keystore

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.timeout(420)]

# Rendezvous: rank 0 accepts NNODES connections on MASTER_PORT; every rank (rank 0 too) connects
# and sends its rank; rank 0 writes what it received, sorted, to /data/ranks.txt. Each connection is
# read by its own `sh` (nc -e): a plain `nc -l` whose stdin is at its end (a container's is) may
# leave before it read what the peer sent.
RENDEZVOUS = (
    'echo "env NODE_RANK=$NODE_RANK NNODES=$NNODES WORLD_SIZE=$WORLD_SIZE NODE_IPS=$NODE_IPS '
    'MASTER=$MASTER_ADDR:$MASTER_PORT ATTEMPT=$PRIME_GROUP_ATTEMPT"; echo "peers $PRIME_PEERS"; '
    'if [ "$NODE_RANK" = 0 ]; then rm -f /data/seen; '
    '(i=0; while [ $i -lt $NNODES ]; do busybox nc -l -p $MASTER_PORT -e sh -c "read r; echo \\$r >> /data/seen"; '
    'i=$((i+1)); done; '
    'busybox sort -n /data/seen > /data/ranks.txt; echo "seen $(cat /data/seen | busybox tr -d \\\\n)") & L=$!; fi; '
    'ok=0; for t in $(seq 1 150); do if echo $NODE_RANK | busybox nc -w 2 $MASTER_ADDR $MASTER_PORT; then ok=1; break; fi; '
    'sleep 0.2; done; [ $ok = 1 ] || exit 7; '
    'if [ "$NODE_RANK" = 0 ]; then wait $L; fi; echo "rank $NODE_RANK done"'
)
# Checkpoints: attempt 0 writes /data/ckpt.txt naming its rank and waits; a later attempt copies
# the checkpoint it found to /data/resumed.txt and exits 0 once /data/go appears.
CHECKPOINT = (
    "trap 'exit 0' TERM; "
    'if [ "$PRIME_GROUP_ATTEMPT" = 0 ]; then echo "rank $NODE_RANK" > /data/ckpt.txt; '
    "while true; do sleep 0.2 & wait $!; done; fi; "
    'cat /data/ckpt.txt > /data/resumed.txt 2>/dev/null || echo none > /data/resumed.txt; '
    'echo "attempt $PRIME_GROUP_ATTEMPT rank $NODE_RANK resumed $(cat /data/resumed.txt)"; '
    "while [ ! -f /data/go ]; do sleep 0.2 & wait $!; done; exit 0"
)


async def _task(world: World, task_id: str) -> dict[str, Any]:
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}")
    assert status == 200, answer
    return answer


async def _create(world: World, spec: dict[str, Any]) -> str:
    status, task = await signed_call(world.owner, "POST", world.url, "/tasks", json.dumps(spec).encode())
    assert status == 201, task
    return str(task["id"])


async def _finished(world: World, task_id: str, timeout_s: float = 90) -> dict[str, Any]:
    async def final() -> dict[str, Any] | None:
        shown = await _task(world, task_id)
        return shown if shown["state"] in ("Completed", "Failed", "Stopped") else None

    return await eventually(final, timeout_s=timeout_s, what=f"task {task_id} to finish")


async def _logs(world: World, task_id: str) -> list[dict[str, Any]]:
    status, raw = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/logs", raw=True)
    assert status == 200, raw
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


async def _healthy(world: World, address: str) -> bool:
    return ((await world.nodes()).get(address) or {}).get("state") == "Healthy"


async def _up(world: World, miners: list[Miner]) -> None:
    await asyncio.gather(*(m.process.start_async(timeout_s=120) for m in miners))
    for m in miners:
        await world.validator_client.report_validation(m.address, True, bytes.fromhex(m.address[2:]).rjust(32, b"\0"))
    for m in miners:
        await eventually(lambda m=m: _healthy(world, m.address), timeout_s=120, what=f"{m.process.name} Healthy")


async def test_group_tasks_gang_start_rendezvous_timeout_and_restart_after_kill(
        role_processes: RoleProcesses, anvil, deployment, docker_client: docker.DockerClient, busybox_image: str,
        tmp_path: Path) -> None:
    world = await make_world(anvil, deployment, role_processes, tmp_path / "world", requirements=Requirements(min_gpus=0))
    miners = [Miner(f"miner-{n}", world, anvil, deployment, role_processes, tmp_path / n, task_ports=free_port_range(4))
              for n in "abc"]
    try:
        await _up(world, miners[:2])
        await _timeout_then_elastic_rendezvous(world, miners, busybox_image)
        await _up(world, miners[2:])
        await _killed_member_restarts_elsewhere(world, miners, busybox_image)
        _no_member_started_before_its_attempt_was_placed(world.master.logs())
    finally:
        for m in miners:
            remove_containers(docker_client, node_containers(docker_client, m.address))
        await world.close()


async def _timeout_then_elastic_rendezvous(world: World, miners: list[Miner], image: str) -> None:
    command = ["sh", "-c", RENDEZVOUS]
    three = await _create(world, {"image": image, "command": command, "persistent": True,
                                  "group": {"nodes": 3, "start_timeout_s": 6}})
    for _ in range(10):  # Pending, nothing placed, until the timeout
        shown = await _task(world, three)
        if shown["state"] != "Pending":
            break
        assert shown["group"]["phase"] == "Pending" and all(r["node"] is None for r in shown["replicas"]), shown
        await asyncio.sleep(0.3)
    shown = await _finished(world, three, timeout_s=30)
    assert shown["state"] == "Failed" and shown["group"]["phase"] == "Failed", shown
    reason = shown["group"]["reason"]
    assert "could not start within 6s" in reason and "at least 3 nodes" in reason and "2 fit now" in reason, reason
    assert all(r["node"] is None and r["state"] == "Failed" for r in shown["replicas"]), shown

    # The buyer's own command line, as an ML team would type it: a 2-node group, then 2:3 on the same two nodes.
    key = write_keystore(world.data_dir.parent / "owner.json", world.owner)
    buyer = Prime(miner_env(world.data_dir.parent / "buyer-home"))
    where = ("--master-url", world.url, "--key-file", key)
    for nodes, size in (("2", {"nodes": 2}), ("2:3", {"nodes": 2, "max_nodes": 3})):
        created = await buyer.json("buyer", "task", "create", "--image", image, "--nodes", nodes, "--persistent", *where,
                                   "--json", "--", *command)
        assert created["spec"]["group"] == size, created
        shown = await _rendezvous(world, buyer, where, created["id"], miners[:2])
        states = [r["state"] for r in shown["replicas"]]
        assert states == (["Completed", "Completed"] if nodes == "2" else ["Completed", "Completed", "Stopped"]), shown


async def _rendezvous(world: World, buyer: Prime, where: tuple[str, ...], task_id: str, nodes: list[Miner]) -> dict[str, Any]:
    """The rendezvous group ``task_id`` ran on ``nodes``: every rank reached rank 0, every member's log shows its peers."""
    shown = await _finished(world, task_id)
    assert shown["state"] == "Completed", shown
    group = shown["group"]
    assert group["attempt"] == 0 and [m["rank"] for m in group["members"]] == [0, 1], group
    assert {m["node"].lower() for m in group["members"]} == {m.address.lower() for m in nodes}

    async def ranks() -> bytes | None:  # once rank 0's final sync is in
        status, raw = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/files/ranks.txt?replica=0",
                                        raw=True)
        return raw if status == 200 else None

    raw = await eventually(ranks, timeout_s=30, what="rank 0's ranks.txt through the master")
    assert raw.split() == [b"0", b"1"]  # every rank reached rank 0 at MASTER_ADDR:MASTER_PORT

    logs = await _logs(world, task_id)
    rank0 = group["members"][0]
    ips = ",".join(m["address"] for m in group["members"])
    for rank in (0, 1):
        lines = [x["line"] for x in logs if x["replica"] == rank]
        assert f"env NODE_RANK={rank} NNODES=2 WORLD_SIZE=2 NODE_IPS={ips} " \
               f"MASTER={rank0['address']}:{rank0['rendezvous_port']} ATTEMPT=0" in lines, lines
        (peers,) = [json.loads(line.removeprefix("peers ")) for line in lines if line.startswith("peers ")]
        assert [(p["rank"], p["node"].lower(), p["port"]) for p in peers] == \
            [(m["rank"], m["node"].lower(), m["peer_port"]) for m in group["members"]]
        assert f"rank {rank} done" in lines
    assert all(x["rank"] == x["replica"] for x in logs)  # a group's merged lines name their rank
    printed = (await buyer.run("buyer", "logs", task_id, *where)).stdout.splitlines()
    assert "[rank 0] rank 0 done" in printed and "[rank 1] rank 1 done" in printed, printed
    show = (await buyer.run("buyer", "task", "show", task_id, *where)).stdout
    assert "Completed" in show and all(m["node"] in show for m in group["members"]), show
    return shown


async def _killed_member_restarts_elsewhere(world: World, miners: list[Miner], image: str) -> None:
    task_id = await _create(world, {"image": image, "command": ["sh", "-c", CHECKPOINT],
                                    "persistent": True, "group": {"nodes": 2}})

    async def running() -> dict[str, Any] | None:
        shown = await _task(world, task_id)
        return shown if shown["group"]["phase"] == "Running" and shown["group"]["attempt"] == 0 else None

    shown = await eventually(running, timeout_s=90, what="attempt 0 Running")
    by_node = {m.address.lower(): m for m in miners}
    first = [by_node[m["node"].lower()] for m in shown["group"]["members"]]
    spare = next(m for m in miners if m not in first)

    async def synced() -> bool:
        status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/files")
        assert status == 200, answer
        return {(f["replica"], f["path"]) for f in answer["files"]} >= {(0, "ckpt.txt"), (1, "ckpt.txt")}

    await eventually(synced, timeout_s=60, what="both checkpoints synced")
    victim, survivor = first[1], first[0]
    victim.process.kill()  # kill -9: rank 1's miner is gone (its container keeps running)

    async def restarted() -> dict[str, Any] | None:
        shown = await _task(world, task_id)
        g = shown["group"]
        return shown if g["phase"] == "Running" and g["attempt"] == 1 else None

    shown = await eventually(restarted, timeout_s=90, what="the group Running again as attempt 1")
    members = [(m["rank"], m["node"].lower()) for m in shown["group"]["members"]]
    assert members == [(0, survivor.address.lower()), (1, spare.address.lower())], members
    assert shown["group"]["restarts"] == 1 and "is gone" in shown["group"]["reason"], shown["group"]
    for rank, miner in ((0, survivor), (1, spare)):
        resumed = miner.replica_dir(task_id, rank) / "resumed.txt"
        async def written(path: Path = resumed) -> bool:
            return path.is_file() and path.read_text().strip() != ""

        await eventually(written, timeout_s=30, what=f"rank {rank}'s resumed.txt")
        assert resumed.read_text().strip() == f"rank {rank}"  # its own rank's checkpoint (rank 1's from the master)
        (miner.replica_dir(task_id, rank) / "go").write_text("")
    shown = await _finished(world, task_id)
    assert shown["state"] == "Completed" and [r["attempt"] for r in shown["replicas"]] == [1, 1], shown


_REPLICA_LINE = re.compile(r"task (\S+) replica (\d+) on (\S+): (\w+) -> (\w+) \((.*)\)$")


def _no_member_started_before_its_attempt_was_placed(log: str) -> None:
    """From the master's log: for every group attempt, each member was Assigned before any member
    of the same attempt was reported Pulling or Running."""
    placed: dict[tuple[str, int], set[int]] = {}  # (task, attempt) -> ranks assigned
    size: dict[tuple[str, int], int] = {}
    current: dict[tuple[str, int], int] = {}  # (task, replica) -> its attempt
    checked = 0
    for line in log.splitlines():
        m = _REPLICA_LINE.search(line)
        if m is None:
            continue
        task, replica, _node, _old, new, reason = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5), m.group(6)
        g = re.match(r"placed on \S+ \(rank (\d+) of (\d+), group attempt (\d+)\)", reason)
        if new == "Assigned" and g:
            key = (task, int(g.group(3)))
            placed.setdefault(key, set()).add(int(g.group(1)))
            size[key] = int(g.group(2))
            current[(task, replica)] = key[1]
        elif new in ("Pulling", "Running") and (task, replica) in current:
            key = (task, current[(task, replica)])
            assert len(placed[key]) == size[key], f"{task} attempt {key[1]}: rank {replica} started while " \
                                                  f"only ranks {sorted(placed[key])} of {size[key]} were placed"
            checked += 1
    assert checked >= 4, f"only {checked} member starts found in the master's log"
