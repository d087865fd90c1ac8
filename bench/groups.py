"""How fast does a group task start, and restart after a member's node dies? Prints figures; asserts nothing.

Setup (as bench/recovery.py): a real anvil, a real discovery process and a real `prime master
start` process with the master's default liveness settings (``StateConfig``: Unhealthy after 2
missed heartbeats, Dead after 3, 0.5 s grace) at the heartbeat interval given; nodes with their
own keys, registered, approved and joined on chain, played by the tests' FakeMiner
(tests/roles/master/fake_miner.py: real signatures, real joinRun, no containers), each
heartbeating at that interval with its own ``task_ports`` range and ``run_desired`` on: every
replica the master desires is reported Running (its attempt) from the node's next heartbeat
on, like a miner whose containers start at once (a real miner also reports at its next beat).

Measured, for each group size N (``{"image": "busybox", "gpus": 1, "group": {"nodes": N}}``
POSTed to /tasks by the run's owner; its group's phase read from GET /tasks/{id}):

1. *start*: from the POST to the group placed (phase Starting, attempt 0) and to every member
   Running (phase Running);
2. *restart*: once Running, rank 0's node stops heartbeating (its death). From its last
   heartbeat: the master marks it Dead (*dead detection*), the group Restarting, the group
   placed again on the N - 1 survivors plus a spare (attempt 1; the wait from Dead to it is
   the *re-placement*: a first restart has no backoff, so it is the tick that places it; a
   second one would wait ``restart_backoff_s``, 5 s by default, printed apart if any), then
   Running again (*placement to running*). The goal (issue 15) is a restart within dead
   detection + 2 s.

Restarts are measured from the largest group down, each on the nodes still alive (every death
costs one node), so the nodes started are max(largest N, N_k + 1 + k over the sizes, largest first).

Usage: python bench/groups.py [--sizes 2,4,8] [--restart-sizes 8,4,2] [--interval 1]
(about a minute with the defaults: 9 nodes, registered one after the other on chain.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' FakeMiner and process helpers when run from a checkout


from bench.world import deploy_for_bench, start_world, wait_for  # noqa: E402
from prime.chain.anvil import start_anvil  # noqa: E402
from prime.roles.master.groups import GroupSpec  # noqa: E402
from prime.roles.master.lifecycle import StateConfig  # noqa: E402
from tests.fixtures.processes import RoleProcesses  # noqa: E402
from tests.roles.master.fake_miner import (  # noqa: E402
    FakeMiner,
    World,
    signed_call,
)

PORTS_BASE = 42_000  # node i offers PORTS_BASE + 10 i .. + 9 (numbers only: a FakeMiner binds none of them)
POLL_S = 0.02


async def task_view(world: World, task_id: str) -> dict[str, Any]:
    status, task = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}")
    if status != 200:
        raise RuntimeError(f"GET /tasks/{task_id}: {status} {task}")
    return task


def phase(task: dict[str, Any]) -> tuple[str, int]:
    group = task.get("group") or {}
    return group.get("phase", "?"), group.get("attempt", -1)


async def create_group(world: World, nodes: int) -> str:
    spec = {"image": "busybox", "gpus": 1, "group": {"nodes": nodes}}
    status, task = await signed_call(world.owner, "POST", world.url, "/tasks", json.dumps(spec).encode())
    if status != 201:
        raise RuntimeError(f"POST /tasks: {status} {task}")
    return str(task["id"])


async def stop_group(world: World, task_id: str, interval_s: float) -> None:
    """Stop it and wait until its members are off their nodes (their ports are free for the next group)."""
    status, body = await signed_call(world.owner, "DELETE", world.url, f"/tasks/{task_id}")
    if status not in (200, 202):
        raise RuntimeError(f"DELETE /tasks/{task_id}: {status} {body}")

    async def stopped() -> bool:
        return (await task_view(world, task_id))["state"] in ("Stopped", "Failed", "Completed")

    await wait_for(stopped, timeout_s=10 + 5 * interval_s, what=f"task {task_id} stopped", interval_s=0.1)


@dataclass
class Milestones:
    """First time (monotonic) each thing was seen."""

    seen: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, condition: bool) -> None:
        if condition and name not in self.seen:
            self.seen[name] = time.monotonic()


async def one_start(world: World, size: int, interval_s: float) -> tuple[str, dict[str, float]]:
    marks = Milestones()
    began = time.monotonic()
    task_id = await create_group(world, size)
    deadline = began + 30 + 5 * interval_s
    while "running" not in marks.seen:
        got, attempt = phase(await task_view(world, task_id))
        marks.mark("placed", got in ("Starting", "Running") and attempt == 0)
        marks.mark("running", got == "Running" and attempt == 0)
        if time.monotonic() > deadline:
            raise RuntimeError(f"group of {size} ({task_id}) not Running in time: phase {got}, attempt {attempt}")
        await asyncio.sleep(POLL_S)
    return task_id, {k: v - began for k, v in marks.seen.items()}


async def one_death(world: World, alive: list[FakeMiner], size: int, interval_s: float,
                    backoff_s: float) -> tuple[str, dict[str, float], str]:
    """A group of ``size`` Running on ``alive``; rank 0's node dies (and leaves ``alive``)."""
    task_id, _ = await one_start(world, size, interval_s)
    members = (await task_view(world, task_id))["group"]["members"]
    before = {m["node"] for m in members}
    victim = next(m for m in alive if m.address == members[0]["node"])
    victim.stop_heartbeats()
    await victim.heartbeat()  # its last heartbeat: from now on it is dead
    died = time.monotonic()
    alive.remove(victim)
    marks = Milestones()
    deadline = died + 60 + 10 * interval_s + backoff_s
    after: set[str] = set()
    while "running" not in marks.seen:
        if "dead" not in marks.seen:
            marks.mark("dead", (await world.nodes()).get(victim.address, {}).get("state") == "Dead")
        task = await task_view(world, task_id)
        got, attempt = phase(task)
        marks.mark("placed", got in ("Starting", "Running") and attempt >= 1)
        marks.mark("running", got == "Running" and attempt >= 1)
        if attempt >= 1:
            after = {m["node"] for m in task["group"]["members"]}
        if time.monotonic() > deadline:
            raise RuntimeError(f"group of {size} ({task_id}) not Running again in time: phase {got}, attempt {attempt}")
        await asyncio.sleep(POLL_S)
    await stop_group(world, task_id, interval_s)
    survivors = len(after & (before - {victim.address}))
    spares = len(after - before)
    where = f"{survivors} survivor{'s' if survivors != 1 else ''} + {spares} spare{'s' if spares != 1 else ''}" + \
        (" (the dead node among them!)" if victim.address in after else "")
    return task_id, {k: v - died for k, v in marks.seen.items()}, where


TRANSITION = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?: (task (\S+) group attempt (-?\d+): (\S+) -> (\S+) .*)$")


@dataclass(frozen=True)
class Transition:
    at: float  # the master's log time (its wall clock, ms)
    task: str
    attempt: int
    old: str
    new: str
    line: str


def transitions(log_path: Path) -> list[Transition]:
    """The master's "task X group attempt N: A -> B (...)" lines."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        found = TRANSITION.match(line)
        if found:
            at = datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append(Transition(at, found[3], int(found[4]), found[5], found[6], f"  {found[1][11:]} {found[2][:150]}"))
    return out


def logged_restart(lines: list[Transition], task_id: str) -> tuple[float, float] | None:
    """(Restarting -> Starting, Starting -> Running of attempt 1) in seconds, as the master logged them."""
    at = {(t.attempt, t.new): t.at for t in lines if t.task == task_id}
    restarting, starting, running = at.get((0, "Restarting")), at.get((1, "Starting")), at.get((1, "Running"))
    if restarting is None or starting is None or running is None:
        return None
    return starting - restarting, running - starting


def nodes_needed(sizes: list[int], restart_sizes: list[int]) -> int:
    need = max(sizes, default=1)
    for k, size in enumerate(sorted(restart_sizes, reverse=True)):
        need = max(need, size + 1 + k)
    return need


async def main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    restart_sizes = sorted((int(s) for s in args.restart_sizes.split(",") if s), reverse=True)
    interval = args.interval
    backoff_s = GroupSpec(1).backoff_s(1)  # a first restart's configured wait (none since the first restart is immediate)
    count = nodes_needed(sizes, restart_sizes)
    starts: list[tuple[int, dict[str, float]]] = []
    restarts: list[tuple[int, str, dict[str, float], str]] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="prime-bench-groups-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        (work / "world").mkdir()
        anvil = start_anvil(None, log_path=work / "anvil.log")
        processes = RoleProcesses(work / "logs")
        lines: list[Transition] = []
        try:
            deployment = await deploy_for_bench(anvil, work)
            world = await start_world(anvil, deployment, processes, work / "world", interval, args.dead_after, args.grace)
            try:
                alive: list[FakeMiner] = []
                for i in range(count):
                    miner = await world.new_miner(anvil=anvil)
                    miner.task_ports = (PORTS_BASE + 10 * i, PORTS_BASE + 10 * i + 9)
                    miner.run_desired = True
                    miner.start_heartbeats(interval)
                    alive.append(miner)

                async def healthy() -> bool:
                    nodes = await world.nodes()
                    return sum(1 for n in nodes.values() if n["state"] == "Healthy") >= count

                await wait_for(healthy, timeout_s=60 + 3 * interval, what=f"{count} nodes Healthy", interval_s=0.1)
                await asyncio.sleep(interval)  # a heartbeat with task_ports from each since it became Healthy
                print(f"{count} nodes Healthy after {time.monotonic() - began:.1f} s (heartbeat {interval:g} s, "
                      f"Dead after {args.dead_after} missed + {args.grace:g} s grace)")
                for size in sizes:
                    task_id, times = await one_start(world, size, interval)
                    await stop_group(world, task_id, interval)
                    starts.append((size, times))
                    print(f"group of {size}: placed {times['placed']:.2f} s, every member Running "
                          f"{times['running']:.2f} s after the POST")
                for size in restart_sizes:
                    task_id, times, where = await one_death(world, alive, size, interval, backoff_s)
                    restarts.append((size, task_id, times, where))
                    print(f"group of {size}, rank 0's node dead: Dead {times['dead']:.2f} s, Running again "
                          f"{times['running']:.2f} s after its last heartbeat, on {where}")
            finally:
                await world.close()
                lines = transitions(world.master.log_path)
                processes.stop_all()
        finally:
            anvil.stop()

    print(f"\nstart (seconds from the POST; members report Running at their next heartbeat, every {interval:g} s)")
    print(f"{'members':>8} {'placed':>8} {'Running':>8}")
    for size, times in starts:
        print(f"{size:>8} {times['placed']:>8.2f} {times['running']:>8.2f}")

    print(f"\nrestart after rank 0's node died (seconds from its last heartbeat, polled). A first restart's "
          f"configured backoff: {backoff_s:g} s (taken off below if any); goal: Running again within dead detection + 2 s")
    print(f"{'members':>8} {'Dead':>6} {'backoff':>8} {'placed':>7} {'->Run':>6} {'Running':>8} {'-backoff':>9} "
          f"{'goal':>6} {'result':>7}  on")
    for size, _, t, where in restarts:
        backoff = t["placed"] - t["dead"]          # Dead -> placed again: the configured wait + up to a tick
        to_running = t["running"] - t["placed"]    # placed -> every member Running
        apart = t["running"] - backoff_s           # the restart, apart from the configured backoff
        goal = t["dead"] + 2
        print(f"{size:>8} {t['dead']:>6.2f} {backoff:>8.2f} {t['placed']:>7.2f} {to_running:>6.2f} {t['running']:>8.2f} "
              f"{apart:>9.2f} {goal:>6.2f} {'met' if apart <= goal else 'MISSED':>7}  {where}")
    print("  Dead: the master marks the node Dead (dead detection); backoff: Dead -> attempt 1 placed (any configured "
          "wait + the tick that places it); placed: attempt 1 placed; ->Run: placed -> every member Running (their "
          "next heartbeats); -backoff: Running minus any configured backoff, against goal = Dead + 2 s")
    print("\nthe same restarts on the master's clock (its log lines' times)")
    print(f"{'members':>8} {'Restarting->Starting':>21} {'Starting->Running':>18}")
    for size, task_id, _, _ in restarts:
        logged = logged_restart(lines, task_id)
        print(f"{size:>8} " + (f"{logged[0]:>21.3f} {logged[1]:>18.3f}" if logged else "(not in the master's log)"))
    print("\nthe master's group transitions:")
    print("\n".join(t.line for t in lines) if lines else "  (none found in the master's log)")
    print(f"\ntotal {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,4,8", help="comma-separated group sizes to start")
    parser.add_argument("--restart-sizes", default="8,4,2", help="comma-separated group sizes to kill a member of")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval in seconds")
    defaults = StateConfig()
    parser.add_argument("--dead-after", type=int, default=defaults.dead_after_missed,
                        help=f"missed heartbeats before Dead (the master's default: {defaults.dead_after_missed})")
    parser.add_argument("--grace", type=float, default=defaults.grace_s,
                        help=f"seconds of grace (the master's default: {defaults.grace_s:g})")
    asyncio.run(main(parser.parse_args()))
