"""Telling a task's own exit from one the engine (or someone outside the miner) caused (pure).

The rule (``lost_reason``): a container of this miner that has exited is **Lost**, not
Completed or Failed, when its exit coincides with the engine stopping it and the miner did
not ask for the stop:

- the engine sent it a signal the miner did not ask for: a ``kill`` event on the engine's event
  stream (``docker stop`` / ``docker kill`` from outside, or any stop by the engine itself while
  the stream was up) with no stop intent of the miner's for that replica in the last
  ``STOP_GRACE_S`` (the miner records an intent before every stop or replacement it asks for);
- or it finished while the engine was away: its ``State.FinishedAt`` falls within a window in
  which the miner could not reach the engine (the event stream broke, or engine calls failed,
  until it answered again), give or take ``OUTAGE_SLACK_S``. A dockerd shutdown closes its API
  (and so the event stream) first, then sends every container its stop signal (SIGTERM, SIGKILL
  after the timeout): a task that exits 0 on SIGTERM looks completed in ``docker inspect``;
  only its timing tells the truth.

Every other exit is the task's own: exit 0 is Completed, any other code (137 and 143 included,
when no outside signal was seen; ``OOMKilled``) is Failed. The miner's own stops never show:
a container the miner stops reads Stopped until it is removed (``DockerExecutor._removing``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

Key = tuple[str, int]

STOP_GRACE_S = 120.0  # a kill event this soon after the miner asked for a stop is the miner's own
OUTAGE_SLACK_S = 2.0  # clock slack around an engine outage window (wall clock vs Docker's)
MAX_OUTAGES = 16  # outage windows remembered (the oldest go first)
MAX_SIGNALLED = 4096  # containers with an outside signal remembered
SIGNAL_KEPT_S = 3600.0  # an outside signal is remembered this long (monotonic)
ALL_REPLICAS = -1  # a stop intent keyed (task id, ALL_REPLICAS) covers every replica of the task


@dataclass(frozen=True)
class Marks:
    """What the miner knows about stops: its own intents, outside signals and engine outages."""

    stops: Mapping[Key, float] = field(default_factory=dict)  # key -> when the miner asked (monotonic)
    signalled: Mapping[str, tuple[str, float]] = field(default_factory=dict)  # container id -> (why, when seen)
    outages: tuple[tuple[float, float], ...] = ()  # (since, until), wall clock (unix seconds)
    away_since: float | None = None  # wall clock: the engine has been unreachable since


def stop_asked(marks: Marks, key: Key, now: float) -> Marks:
    """The miner is about to stop (or replace) this replica's container."""
    return replace(marks, stops={**marks.stops, key: now})


def engine_signal(marks: Marks, key: Key | None, container_id: str, signal: str | None, now: float) -> Marks:
    """The engine reports a ``kill`` of one of this miner's containers; outside ones are remembered."""
    intents = [marks.stops.get(k) for k in ((key, (key[0], ALL_REPLICAS)) if key is not None else ())]
    asked = max((at for at in intents if at is not None), default=None)
    if asked is not None and now - min(asked, now) <= STOP_GRACE_S:
        return marks  # the miner's own stop
    why = f"the Docker engine sent it signal {signal or '?'} without the miner asking (the engine shut down or restarted, or the container was stopped from outside)"
    signalled = {**marks.signalled, container_id: (why, now)}
    while len(signalled) > MAX_SIGNALLED:
        del signalled[next(iter(signalled))]
    return replace(marks, signalled=signalled)


def engine_away(marks: Marks, wall: float) -> Marks:
    """The engine could not be reached (its event stream broke, a call failed) at ``wall``."""
    return marks if marks.away_since is not None else replace(marks, away_since=wall)


def engine_back(marks: Marks, wall: float, last_seen: float | None = None) -> Marks:
    """The engine answers again: the window since it went away (or since ``last_seen``, the last
    time it was known up, when that is earlier) is an outage."""
    since = marks.away_since
    if last_seen is not None:
        since = last_seen if since is None else min(since, last_seen)
    if since is None:
        return marks
    outages = (*marks.outages, (since, max(since, wall)))[-MAX_OUTAGES:]
    return replace(marks, outages=outages, away_since=None)


def lost_reason(marks: Marks, container_id: str | None, finished_at: float | None) -> str | None:
    """Why an exited container is Lost (one sentence), or None when its exit is the task's own."""
    if container_id is not None and container_id in marks.signalled:
        return marks.signalled[container_id][0]
    if finished_at is not None:
        for since, until in marks.outages:
            if since - OUTAGE_SLACK_S <= finished_at <= until + OUTAGE_SLACK_S:
                return "it exited while the Docker engine was away (the engine shut down or restarted and stopped it)"
    return None


def prune(marks: Marks, live_containers: Iterable[str], now: float) -> Marks:
    """Forget stop intents past their grace and outside signals of containers that are gone."""
    live = set(live_containers)
    stops = {k: at for k, at in marks.stops.items() if now - min(at, now) <= STOP_GRACE_S}
    signalled = {c: (why, at) for c, (why, at) in marks.signalled.items()
                 if c in live or now - min(at, now) <= STOP_GRACE_S}
    signalled = {c: v for c, v in signalled.items() if now - min(v[1], now) <= SIGNAL_KEPT_S}
    if len(stops) == len(marks.stops) and len(signalled) == len(marks.signalled):
        return marks
    return replace(marks, stops=stops, signalled=signalled)
