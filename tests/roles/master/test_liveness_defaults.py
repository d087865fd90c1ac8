"""The master's default liveness (issue 13 goal: "Dead within 3 intervals + 1 s by default,
rescheduled within 1 s after"), in the pure core, driven by Ticks at the master's own cadence:
a silent node is Dead and its replica placed elsewhere by then; a node that misses two
heartbeats in a row (or beats half an interval late every time) is never Dead."""

from __future__ import annotations

from pathlib import Path

import pytest

from prime.protocol.nodes import NodeState
from prime.roles.master.service import MasterSettings
from prime.roles.master.state import (
    ChainSynced,
    HeartbeatReceived,
    MasterStarted,
    MasterState,
    RecordTransition,
    StartReplica,
    StateConfig,
    TaskCreated,
    Tick,
    handle,
)
from tests.roles.master.test_state import EMPTY, SPECS, A, B, member, new_task, of

INTERVALS = (1.0, 5.0, 30.0)


def _world(interval_s: float) -> tuple[MasterState, float]:
    config = StateConfig(heartbeat_interval_s=interval_s)  # the defaults, as `prime master start` has them
    tick = MasterSettings(run_id=1, public_url="http://m", data_dir=Path("."), state=config).tick_interval_s
    st = MasterState(config)
    handle(st, MasterStarted(0.0))
    handle(st, ChainSynced(0.0))
    for node in (A, B):
        member(st, node)
    now = 0.0
    while now + tick <= 2.0:  # the master ticks all along (a first late tick would be a gap in its view)
        now += tick
        handle(st, Tick(now, every_s=tick))
    assert st.watching_since == 0.0
    return st, tick


@pytest.mark.parametrize("interval_s", INTERVALS)
def test_a_silent_node_is_dead_and_its_replica_placed_elsewhere_within_three_intervals_and_a_second(
        interval_s: float) -> None:
    st, tick = _world(interval_s)
    handle(st, TaskCreated(new_task("t", gpus=1)))
    holder = st.tasks["t"].replicas[0].node
    assert holder is not None
    other = B if holder == A else A
    last = 2.0
    handle(st, HeartbeatReceived(holder, last, EMPTY))  # the holder's last heartbeat
    now, dead_at, placed_at = last, None, None
    while now < last + 3 * interval_s + 1.0 and placed_at is None:
        now += tick
        handle(st, HeartbeatReceived(other, now, EMPTY))
        out = handle(st, Tick(now, every_s=tick))
        if any(t.node == holder and t.new == NodeState.DEAD for t in of(out, RecordTransition)):
            dead_at = now
        if StartReplica(other, "t", 0) in of(out, StartReplica):
            placed_at = now
    assert dead_at is not None and now <= last + 3 * interval_s + 1.0, (dead_at, now)
    assert placed_at == dead_at  # in the same tick
    assert st.tasks["t"].replicas[0].attempt == 1 and st.tasks["t"].replicas[0].node == other


@pytest.mark.parametrize("interval_s", INTERVALS)
def test_a_node_that_misses_two_heartbeats_or_beats_late_each_time_is_never_dead(interval_s: float) -> None:
    st, tick = _world(interval_s)
    beats = [2.0]
    for _ in range(20):  # each one half an interval late
        beats.append(beats[-1] + 1.5 * interval_s)
    beats.append(beats[-1] + 3 * interval_s + 0.4)  # two missed in a row, the third a little late
    for _ in range(5):
        beats.append(beats[-1] + interval_s)
    now, states = 2.0 - (2.0 % tick), set()
    for beat in beats:
        while now + tick < beat:
            now += tick
            handle(st, Tick(now, every_s=tick))
            states.add(st.nodes[A].state)
        handle(st, HeartbeatReceived(A, beat, EMPTY))
    assert NodeState.DEAD not in states, states
    assert NodeState.UNHEALTHY in states  # two missed in a row are noticed
    assert st.nodes[A].state == NodeState.HEALTHY and st.watching_since == 0.0


def test_the_defaults_meet_the_goal_with_the_masters_tick() -> None:
    for interval_s in INTERVALS:
        config = StateConfig(heartbeat_interval_s=interval_s)
        tick = MasterSettings(run_id=1, public_url="http://m", data_dir=Path("."), state=config).tick_interval_s
        assert (config.unhealthy_after_missed, config.dead_after_missed) == (2, 3)
        assert config.dead_after_s + tick <= 3 * interval_s + 1.0
        assert config.dead_after_s > 3 * interval_s  # three heartbeats missed, not two
    assert SPECS.gpu_count >= 1
