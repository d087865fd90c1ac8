"""How fast does a run recover from a node's death? Prints figures; asserts nothing.

Setup: a real anvil, a real discovery process and a real `prime master start` process with the
master's default liveness settings (``StateConfig``: Unhealthy after 2 missed heartbeats, Dead
after 3, 0.5 s grace; health judged every 0.4 s at most) at the heartbeat interval given; two nodes with their own keys, registered, approved
and joined on chain, played by the tests' FakeMiner (tests/roles/master/fake_miner.py: real
signatures, real joinRun, a real miner's wire, no containers) heartbeating at that interval.
One task with one replica runs on one of them; that node then stops heartbeating (its death).

Measured, from the node's last heartbeat:
- *Dead*: when the master marks it Dead (goal: within 3 intervals + 1 s by default);
- *rescheduled*: when the replica is placed on the other node (goal: within 1 s after Dead);
- *pushed*: when the other node received the start of the new attempt;
- *first log line*: when the master serves the first log line of the new attempt (the other
  node reports it Running with a line at once: the floor of a real container's start).

Usage: python bench/recovery.py [--intervals 1,5,30] [--dead-after N] [--grace S]
(the master's defaults unless given; a 30 s interval takes about 3 minutes.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' FakeMiner and process helpers when run from a checkout


from bench.world import deploy_for_bench, start_world, wait_for  # noqa: E402
from prime.chain.anvil import start_anvil  # noqa: E402
from prime.roles.master.lifecycle import StateConfig  # noqa: E402
from tests.fixtures.processes import RoleProcesses  # noqa: E402
from tests.roles.master.fake_miner import (  # noqa: E402
    World,
    signed_call,
)


async def one_death(world: World, anvil: Any, interval_s: float) -> dict[str, float]:
    first, second = await world.new_miner(anvil=anvil), await world.new_miner(anvil=anvil)
    for miner in (first, second):
        await wait_for(lambda m=miner: _joined(m), timeout_s=60, what="the invite")
        miner.start_heartbeats(interval_s)
    await wait_for(lambda: _all_healthy(world, 2), timeout_s=60 + 3 * interval_s, what="both nodes Healthy")
    status, task = await signed_call(world.owner, "POST", world.url, "/tasks", json.dumps({"image": "busybox", "gpus": 1}).encode())
    assert status == 201, task
    task_id = task["id"]

    async def placed() -> str | None:
        return (await _task(world, task_id))["replicas"][0]["node"]

    holder_address = await wait_for(placed, timeout_s=30, what="placement")
    holder, spare = (first, second) if holder_address == first.address else (second, first)
    holder.report(task_id, 0, "Running")
    await wait_for(lambda: _state(world, task_id, "Running"), timeout_s=10 + 3 * interval_s, what="Running")

    await holder.heartbeat()  # its last heartbeat, from now on it is dead
    died = time.monotonic()
    holder.stop_heartbeats()
    times: dict[str, float] = {}

    async def dead() -> bool:
        return (await world.nodes()).get(holder.address, {}).get("state") == "Dead"

    async def moved() -> bool:
        replica = (await _task(world, task_id))["replicas"][0]
        return replica["node"] == spare.address and replica["attempt"] >= 1

    async def pushed() -> bool:
        return any(s["id"] == task_id and s["attempt"] >= 1 for s in spare.received.starts)

    limit = 30 + 15 * interval_s
    await wait_for(dead, timeout_s=limit, what="Dead", interval_s=0.05)
    times["dead"] = time.monotonic() - died
    await wait_for(moved, timeout_s=limit, what="rescheduled", interval_s=0.02)
    times["rescheduled"] = time.monotonic() - died
    await wait_for(pushed, timeout_s=limit, what="the push", interval_s=0.01)
    times["pushed"] = time.monotonic() - died
    spare.logs[(task_id, 0)] = [{"stream": "stdout", "line": "first line of attempt 1", "ts": time.time()}]
    spare.report(task_id, 0, "Running")
    await spare.heartbeat()

    async def first_line() -> bool:
        status, raw = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/logs", raw=True)
        return status == 200 and b"first line of attempt 1" in raw

    await wait_for(first_line, timeout_s=limit, what="the first log line", interval_s=0.02)
    times["first_log_line"] = time.monotonic() - died
    for miner in (first, second):
        miner.stop_heartbeats()
    return times


async def _joined(miner: Any) -> bool:
    return miner.master_url is not None


async def _all_healthy(world: World, count: int) -> bool:
    nodes = await world.nodes()
    return sum(1 for n in nodes.values() if n["state"] == "Healthy") >= count


async def _task(world: World, task_id: str) -> dict[str, Any]:
    status, task = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}")
    assert status == 200, task
    return task


async def _state(world: World, task_id: str, state: str) -> bool:
    return (await _task(world, task_id))["state"] == state


async def main(args: argparse.Namespace) -> None:
    intervals = [float(s) for s in args.intervals.split(",") if s]
    rows = []
    with tempfile.TemporaryDirectory(prefix="prime-bench-recovery-") as tmp:
        work = Path(tmp)
        anvil = start_anvil(None, log_path=work / "anvil.log")
        try:
            deployment = await deploy_for_bench(anvil, work)
            for interval in intervals:
                (work / f"logs-{interval:g}").mkdir()
                (work / f"i{interval:g}").mkdir()
                processes = RoleProcesses(work / f"logs-{interval:g}")
                world = await start_world(anvil, deployment, processes, work / f"i{interval:g}", interval,
                                          args.dead_after, args.grace)
                try:
                    times = await one_death(world, anvil, interval)
                finally:
                    await world.close()
                    processes.stop_all()
                goal = 3 * interval + 1
                rows.append((interval, times, goal))
                print(f"heartbeat {interval:g} s, dead after {args.dead_after} missed (+{args.grace:g} s grace): "
                      f"Dead {times['dead']:.2f} s (goal ≤ {goal:.0f} s: {'met' if times['dead'] <= goal else 'MISSED'}), "
                      f"rescheduled +{times['rescheduled'] - times['dead']:.2f} s after Dead "
                      f"(goal ≤ 1 s: {'met' if times['rescheduled'] - times['dead'] <= 1 else 'MISSED'}), "
                      f"pushed {times['pushed']:.2f} s, first log line served {times['first_log_line']:.2f} s")
        finally:
            anvil.stop()
    print("\nsummary (seconds from the dead node's last heartbeat)")
    print(f"{'interval':>9} {'Dead':>8} {'resched':>8} {'pushed':>8} {'1st line':>9} {'goal Dead':>10}")
    for interval, times, goal in rows:
        print(f"{interval:>9g} {times['dead']:>8.2f} {times['rescheduled']:>8.2f} {times['pushed']:>8.2f} "
              f"{times['first_log_line']:>9.2f} {goal:>10.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", default="1,5", help="comma-separated heartbeat intervals in seconds")
    defaults = StateConfig()
    parser.add_argument("--dead-after", type=int, default=defaults.dead_after_missed,
                        help=f"missed heartbeats before Dead (the master's default: {defaults.dead_after_missed})")
    parser.add_argument("--grace", type=float, default=defaults.grace_s,
                        help=f"seconds of grace (the master's default: {defaults.grace_s:g})")
    asyncio.run(main(parser.parse_args()))
