"""Group tasks' pure core (issue 15): unit tests per rule, then property tests over random events."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prime.protocol.groups import GroupPhase
from prime.roles.master.groupenv import Member, member_envs
from prime.roles.master.groups import (
    FINAL_PHASES,
    PLACED_PHASES,
    CompleteGroup,
    FailGroup,
    GroupDecision,
    GroupEvent,
    GroupSpec,
    GroupState,
    MemberExited,
    MemberStarted,
    NodeAvailable,
    NodeGone,
    StartMembers,
    StopMembers,
    StopRequested,
    Tick,
    fits,
    handle,
    new_group,
    parse_nodes,
)


def offer(node: str, gpus: int = 8, model: str = "H100", at: float = 0.0, port: int = 29500) -> NodeAvailable:
    return NodeAvailable(node, gpus, model, f"10.0.0.{int(node[1:]) + 1}", (port, port + 9), at)


def group(min_nodes: int = 2, max_nodes: int | None = None, **kw: object) -> GroupState:
    spec = GroupSpec(min_nodes, max_nodes, **kw)
    return new_group("g1", spec, at=0.0)


def starts(decisions: list[GroupDecision]) -> list[StartMembers]:
    return [d for d in decisions if isinstance(d, StartMembers)]


def start_all(g: GroupState, at: float = 1.0) -> None:
    for m in g.members:
        handle(g, MemberStarted(g.attempt, m.rank, at))


# --- spec ----------------------------------------------------------------------------------------


def test_parse_nodes_and_spec_checks() -> None:
    assert parse_nodes("4") == (4, None)
    assert parse_nodes("2:8") == (2, 8)
    with pytest.raises(ValueError, match="N or N:M"):
        parse_nodes("two")
    with pytest.raises(ValueError, match="cannot be fewer"):
        GroupSpec(4, 2)
    with pytest.raises(ValueError, match="at least 1 node"):
        GroupSpec(0)
    assert GroupSpec(3).most_nodes == 3
    spec = GroupSpec(1, backoff_base_s=5, backoff_max_s=30)
    # the first restart at once (a lost node is no crash loop), then 5 s doubling, capped
    assert [spec.backoff_s(k) for k in (0, 1, 2, 3, 4, 5, 6)] == [0.0, 0.0, 5.0, 10.0, 20.0, 30.0, 30.0]


# --- gang placement ------------------------------------------------------------------------------


def test_gang_waits_in_pending_until_n_nodes_fit_then_starts_all_at_once() -> None:
    g = group(3, gpus_per_node=4)
    assert handle(g, offer("n0", at=1)) == []
    assert handle(g, offer("n1", gpus=2, at=2)) == []  # too few GPUs: does not count
    assert handle(g, offer("n2", at=3)) == []
    assert g.phase == GroupPhase.PENDING and g.members == ()
    out = handle(g, offer("n3", at=4))
    assert len(out) == 1 and isinstance(out[0], StartMembers)
    assert out[0].attempt == 0
    assert [(m.rank, m.node) for m in out[0].members] == [(0, "n0"), (1, "n2"), (2, "n3")]
    assert g.phase == GroupPhase.STARTING


def test_start_barrier_running_only_once_every_member_started() -> None:
    g = group(2)
    handle(g, offer("n0"))
    handle(g, offer("n1"))
    handle(g, MemberStarted(0, 1, 1.0))
    assert g.phase == GroupPhase.STARTING
    handle(g, MemberStarted(0, 1, 1.5))  # twice: still one member
    assert g.phase == GroupPhase.STARTING
    handle(g, MemberStarted(0, 0, 2.0))
    assert g.phase == GroupPhase.RUNNING


def test_elastic_takes_up_to_m_nodes_in_node_id_order() -> None:
    g = group(2, 3)
    for n in ("n5", "n1", "n4", "n2"):
        g.offers[n] = offer(n)  # known before the group looks (as if offered while it waited)
    out = handle(g, Tick(1.0))
    (start,) = starts(out)
    assert [m.node for m in start.members] == ["n1", "n2", "n4"]  # up to M = 3, node id order
    assert start.members[0].env["NNODES"] == "3"


def test_n_nodes_start_at_once_without_waiting_for_m() -> None:
    g = group(2, 4)
    handle(g, offer("n0"))
    (start,) = starts(handle(g, offer("n1")))
    assert len(start.members) == 2
    assert handle(g, offer("n2")) == []  # a placed group takes no more nodes
    assert len(g.members) == 2


def test_start_timeout_fails_with_a_reason() -> None:
    g = group(3, gpus_per_node=4, start_timeout_s=300)
    handle(g, offer("n0"))
    handle(g, offer("n1", gpus=2))
    assert handle(g, Tick(299.0)) == []
    out = handle(g, Tick(300.0))
    assert out == [FailGroup("g1", g.reason or "")]
    assert g.phase == GroupPhase.FAILED
    assert g.reason == "Group g1 could not start within 5m: it needs at least 3 nodes with 4 free GPUs each; 1 fit now."
    assert handle(g, offer("n2")) == [] and handle(g, offer("n3")) == []  # final


def test_same_gpu_model_places_only_one_model() -> None:
    g = group(2, 3, same_gpu_model=True)
    handle(g, offer("n0", model="A100"))
    assert handle(g, offer("n1", model="H100")) == []  # two nodes, two models: no gang yet
    handle(g, offer("n2", model="H100"))
    assert g.phase == GroupPhase.STARTING
    assert {m.gpu_model for m in g.members} == {"H100"}
    assert [m.node for m in g.members] == ["n1", "n2"]


def test_same_gpu_model_prefers_the_model_with_most_nodes() -> None:
    g = group(2, 3, same_gpu_model=True)
    for n, model in (("n0", "A100"), ("n1", "A100"), ("n2", "H100"), ("n3", "H100"), ("n4", "H100")):
        g.offers[n] = offer(n, model=model)
    handle(g, Tick(1.0))
    assert [m.node for m in g.members] == ["n2", "n3", "n4"]


def test_same_gpu_model_timeout_reason() -> None:
    g = group(2, same_gpu_model=True, start_timeout_s=90)
    handle(g, offer("n0", model="A100"))
    handle(g, offer("n1", model="H100"))
    handle(g, Tick(90.0))
    assert g.reason == (
        "Group g1 could not start within 1m30s: it needs at least 2 nodes of one GPU model with 1 free GPUs each; "
        "at most 1 of one GPU model fit now."
    )


def test_a_node_with_too_few_ports_does_not_fit() -> None:
    spec = GroupSpec(1)
    assert not fits(spec, NodeAvailable("n0", 8, "H100", "10.0.0.1", (29500, 29500), 0.0))
    assert not fits(spec, NodeAvailable("n0", 8, "H100", "10.0.0.1", (0, 10), 0.0))
    assert fits(spec, NodeAvailable("n0", 8, "H100", "10.0.0.1", (29500, 29501), 0.0))


# --- environment ---------------------------------------------------------------------------------


def test_env_of_every_member_exactly() -> None:
    g = new_group("grp-7", GroupSpec(2, 3, gpus_per_node=4), at=0.0)
    handle(g, NodeAvailable("b", 8, "H100", "10.0.0.2", (30000, 30009), 0.0))
    (start,) = starts(handle(g, NodeAvailable("a", 4, "H100", "10.0.0.1", (29500, 29510), 0.0)))
    peers = (
        '[{"rank":0,"node":"a","address":"10.0.0.1","port":29501,"gpus":4,"gpu_model":"H100"},'
        '{"rank":1,"node":"b","address":"10.0.0.2","port":30001,"gpus":4,"gpu_model":"H100"}]'
    )
    shared = {
        "NNODES": "2",
        "GPUS_PER_NODE": "4",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        "NODE_IPS": "10.0.0.1,10.0.0.2",
        "PRIME_GROUP_ID": "grp-7",
        "PRIME_GROUP_ATTEMPT": "0",
        "PRIME_PEERS": peers,
        # torchrun reads PET_<OPTION> as its options' defaults: `torchrun train.py` needs no flags
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "4",
        "PET_MASTER_ADDR": "10.0.0.1",
        "PET_MASTER_PORT": "29500",
    }
    assert [(m.rank, m.node, dict(m.env)) for m in start.members] == [
        (0, "a", {"NODE_RANK": "0", "PET_NODE_RANK": "0", **shared}),
        (1, "b", {"NODE_RANK": "1", "PET_NODE_RANK": "1", **shared}),
    ]
    assert json.loads(peers)[1]["port"] == 30001


def test_member_envs_needs_ranks_0_to_n_minus_1() -> None:
    m = Member(1, "a", "10.0.0.1", "H100", (1000, 1001))
    with pytest.raises(ValueError, match="ranks 0 .. n-1"):
        member_envs("g", 0, [m], 1)
    with pytest.raises(ValueError):
        member_envs("g", 0, [], 1)


# --- failure, restart, shrink --------------------------------------------------------------------


def running(min_nodes: int, max_nodes: int | None, nodes: list[str], **kw: object) -> GroupState:
    g = group(min_nodes, max_nodes, **kw)
    for n in nodes:
        g.offers[n] = offer(n)
    handle(g, Tick(0.0))
    start_all(g)
    assert g.phase == GroupPhase.RUNNING
    return g


def test_member_failure_stops_the_group_and_restarts_with_attempt_plus_one_on_the_same_nodes() -> None:
    g = running(2, 3, ["n0", "n1", "n2"], backoff_base_s=10)
    out = handle(g, MemberExited(0, 1, 1, at=5.0))
    assert out == [StopMembers("g1", 0, ("n0", "n2"), "rank 1 on n1 exited with code 1")]
    assert g.phase == GroupPhase.RESTARTING and g.members == ()
    (start,) = starts(handle(g, Tick(5.0)))  # the first restart: at once
    assert start.attempt == 1
    assert [m.node for m in start.members] == ["n0", "n1", "n2"]  # n1 is healthy: only its process failed
    assert {m.env["PRIME_GROUP_ATTEMPT"] for m in start.members} == {"1"}
    start_all(g, 6.0)
    handle(g, MemberExited(1, 0, 1, at=7.0))  # a second failure: now the backoff (10 s)
    assert handle(g, Tick(16.9)) == [] and g.phase == GroupPhase.RESTARTING
    (start,) = starts(handle(g, Tick(17.0)))
    assert start.attempt == 2


def test_node_gone_restarts_on_survivors_in_their_ranks_plus_a_replacement_in_the_hole() -> None:
    g = running(3, None, ["n1", "n2", "n3"], backoff_base_s=0)
    handle(g, offer("n0"))  # a new node: lowest id, but survivors are taken first
    out = handle(g, NodeGone("n2", at=5.0))
    assert out == [StopMembers("g1", 0, ("n1", "n3"), "the node n2 of rank 1 is gone")]
    (start,) = starts(handle(g, Tick(5.0)))
    # n1 and n3 keep ranks 0 and 2 (each resumes its own /data where it is); n0 takes over rank 1
    assert [(m.rank, m.node) for m in start.members] == [(0, "n1"), (1, "n0"), (2, "n3")]
    assert start.members[0].env["MASTER_ADDR"] == offer("n1").address  # rank 0 survived: same master


def test_elastic_shrink_down_to_n_and_no_further() -> None:
    g = running(2, 4, ["n0", "n1", "n2", "n3"], backoff_base_s=0, max_restarts=5, start_timeout_s=60)
    handle(g, NodeGone("n3", at=1.0))
    (start,) = starts(handle(g, Tick(1.0)))
    assert [m.node for m in start.members] == ["n0", "n1", "n2"]
    start_all(g)
    handle(g, NodeGone("n0", at=2.0))
    (start,) = starts(handle(g, Tick(2.0)))
    # n0 (rank 0) is gone and there is no replacement: n1 keeps rank 1, n2 (rank 2, past the new
    # size) moves into rank 0 — the fewest members change rank
    assert [(m.rank, m.node) for m in start.members] == [(0, "n2"), (1, "n1")]
    assert start.members[0].env["NNODES"] == "2" and start.members[0].env["WORLD_SIZE"] == "2"
    start_all(g)
    handle(g, NodeGone("n1", at=3.0))
    assert handle(g, Tick(3.0)) == []  # one node left: below N, waits
    assert g.phase == GroupPhase.PENDING and g.members == ()
    (start,) = starts(handle(g, offer("n7", at=10.0)))  # a replacement arrives in time
    assert [m.node for m in start.members] == ["n2", "n7"] and start.attempt == 3


def test_restart_waiting_for_replacements_times_out() -> None:
    g = running(2, None, ["n0", "n1"], backoff_base_s=5, start_timeout_s=30)
    handle(g, NodeGone("n1", at=10.0))
    handle(g, Tick(15.0))  # backoff over: Pending from 15
    assert g.phase == GroupPhase.PENDING
    assert handle(g, Tick(44.0)) == []
    (fail,) = handle(g, Tick(45.0))
    assert isinstance(fail, FailGroup)
    assert fail.reason == "Group g1 could not restart (attempt 1) within 30s: it needs at least 2 nodes with 1 free GPUs each; 1 fit now."


def test_restart_limit_fails_the_group() -> None:
    g = running(1, None, ["n0"], max_restarts=2, backoff_base_s=1)
    t = 1.0
    for attempt in range(2):
        assert handle(g, MemberExited(attempt, 0, 3, t)) == [StopMembers("g1", attempt, (), "rank 0 on n0 exited with code 3")]
        t += 10
        handle(g, Tick(t))
        start_all(g, t)
    out = handle(g, MemberExited(2, 0, 3, t))
    assert out == [
        StopMembers("g1", 2, (), "rank 0 on n0 exited with code 3"),
        FailGroup("g1", "Group g1 failed: rank 0 on n0 exited with code 3; the restart limit (2) is reached."),
    ]
    assert g.phase == GroupPhase.FAILED and g.restarts == 3
    assert handle(g, Tick(t + 1000)) == []


def test_stale_reports_of_an_earlier_attempt_are_ignored() -> None:
    g = running(2, None, ["n0", "n1"], backoff_base_s=0)
    handle(g, MemberExited(0, 0, 1, 1.0))
    handle(g, Tick(1.0))
    assert g.attempt == 1 and g.phase == GroupPhase.STARTING
    assert handle(g, MemberExited(0, 1, 137, 2.0)) == []  # the stopped attempt's member
    handle(g, MemberStarted(0, 0, 2.0))
    handle(g, MemberStarted(0, 1, 2.0))
    assert g.phase == GroupPhase.STARTING
    assert handle(g, MemberExited(1, 5, 1, 2.0)) == []  # no such rank


def test_completed_when_every_member_exits_zero() -> None:
    g = running(2, None, ["n0", "n1"])
    assert handle(g, MemberExited(0, 1, 0, 5.0)) == []
    assert g.phase == GroupPhase.RUNNING
    assert handle(g, MemberExited(0, 1, 0, 5.0)) == []  # repeated
    assert handle(g, MemberExited(0, 0, 0, 6.0)) == [CompleteGroup("g1")]
    assert g.phase == GroupPhase.COMPLETED
    assert handle(g, NodeGone("n0", 7.0)) == []


def test_a_member_failing_after_another_finished_stops_only_the_unfinished() -> None:
    g = running(3, None, ["n0", "n1", "n2"], backoff_base_s=0)
    handle(g, MemberExited(0, 0, 0, 1.0))
    assert handle(g, MemberExited(0, 1, 2, 2.0)) == [StopMembers("g1", 0, ("n2",), "rank 1 on n1 exited with code 2")]


# --- property tests ------------------------------------------------------------------------------

NODES = [f"n{i}" for i in range(7)]
MODELS = ["A100", "H100"]

ops = st.lists(
    st.tuples(st.sampled_from(["avail", "avail", "avail", "gone", "started", "started", "started", "exited", "tick", "tick"]), st.integers(0, 20), st.integers(0, 20)),
    min_size=5,
    max_size=80,
)
specs = st.builds(
    lambda n, extra, gpus, same, restarts, backoff, timeout: GroupSpec(
        n, n + extra, gpus_per_node=gpus, same_gpu_model=same, start_timeout_s=timeout, max_restarts=restarts, backoff_base_s=backoff
    ),
    st.integers(1, 3),
    st.integers(0, 3),
    st.integers(0, 4),
    st.booleans(),
    st.integers(0, 4),
    st.sampled_from([0.0, 1.0, 5.0]),
    st.sampled_from([5.0, 30.0, 200.0]),
)


def fitting_count(g: GroupState) -> int:
    """How many nodes a placement could use now (one model with same_gpu_model), from the offers alone."""
    fit = [o for o in g.offers.values() if fits(g.spec, o)]
    if not g.spec.same_gpu_model:
        return len(fit)
    return max((sum(o.gpu_model == m for o in fit) for m in MODELS), default=0)


def to_event(g: GroupState, op: tuple[str, int, int], now: float) -> GroupEvent:
    kind, a, b = op
    node = NODES[a % len(NODES)]
    ranks = max(1, len(g.members))
    attempt = g.attempt if b % 4 else max(0, g.attempt - 1)  # now and then a stale attempt
    if kind == "avail":
        gpus = b % 5 if b % 4 == 0 else 4  # mostly enough GPUs, now and then too few
        last_port = 20000 + 10 * a + (0 if b % 6 == 0 else 9)  # now and then a single port: does not fit
        return NodeAvailable(node, gpus, MODELS[a % 2], f"10.1.0.{a % len(NODES)}", (20000 + 10 * a, last_port), now)
    if kind == "gone":
        return NodeGone(node, now)
    if kind == "started":
        unstarted = sorted(set(range(len(g.members))) - g.started)
        rank = unstarted[a % len(unstarted)] if unstarted and b % 5 else a % (ranks + 1)  # mostly one not started yet
        return MemberStarted(attempt, rank, now)
    if kind == "exited":
        return MemberExited(attempt, a % (ranks + 1), 0 if b % 3 == 0 else 1, now)
    return Tick(now)


def check_invariants(g: GroupState, spec: GroupSpec) -> None:
    k = len(g.members)
    if g.phase in PLACED_PHASES:
        assert spec.min_nodes <= k <= spec.most_nodes  # never placed (nor running) with fewer than N
        assert [m.rank for m in g.members] == list(range(k))
        assert len({m.node for m in g.members}) == k  # one member per node
        assert all(m.node in g.offers for m in g.members)  # no attempt goes on with a member's node gone
        if spec.same_gpu_model:
            assert len({m.gpu_model for m in g.members}) == 1
        assert g.started <= set(range(k)) and g.finished <= g.started
        assert (g.phase == GroupPhase.RUNNING) == (g.started == set(range(k)))
    else:
        assert k == 0
    if g.phase == GroupPhase.PENDING:
        assert fitting_count(g) < spec.min_nodes  # gang: it waits only while fewer than N fit
    if g.phase != GroupPhase.FAILED:
        assert g.restarts <= spec.max_restarts


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, steps=ops)
def test_random_node_arrivals_deaths_and_exits_keep_the_invariants(spec: GroupSpec, steps: list[tuple[str, int, int]]) -> None:
    g = new_group("g", spec, at=0.0)
    now = 0.0
    last_attempt = -1
    ended = False
    for op in steps:
        now += 1.0 + op[2] % 3
        offers_before = dict(g.offers)
        survivors = dict(g.survivors)  # the last attempt's members still there -> their rank
        event = to_event(g, op, now)
        out = handle(g, event)
        if ended:
            assert out == []  # nothing after Failed / Completed
        for d in out:
            if isinstance(d, StartMembers):
                # attempts strictly increase; the start carries the whole attempt, every member placed
                assert d.attempt > last_attempt
                last_attempt = d.attempt
                assert d.attempt == g.attempt and g.phase == GroupPhase.STARTING
                assert [(m.rank, m.node) for m in d.members] == [(m.rank, m.node) for m in g.members]
                offers_now = {**offers_before, **({event.node: event} if isinstance(event, NodeAvailable) else {})}
                for m in d.members:
                    assert m.node in offers_now and fits(spec, offers_now[m.node])
                    assert m.env["NODE_RANK"] == str(m.rank)
                    assert m.env["NNODES"] == str(len(d.members))
                    assert m.env["WORLD_SIZE"] == str(len(d.members) * max(1, spec.gpus_per_node))
                    assert m.env["PRIME_GROUP_ATTEMPT"] == str(d.attempt)
                    assert len(json.loads(m.env["PRIME_PEERS"])) == len(d.members)
                    if survivors.get(m.node, len(d.members)) < len(d.members):
                        assert m.rank == survivors[m.node]  # a survivor keeps its rank (and its /data)
            elif isinstance(d, StopMembers):
                assert d.attempt == last_attempt
        assert sum(isinstance(d, StartMembers) for d in out) <= 1
        if any(isinstance(d, (FailGroup, CompleteGroup)) for d in out):
            assert g.phase in FINAL_PHASES
        ended = g.phase in FINAL_PHASES
        check_invariants(g, spec)


@settings(max_examples=100, deadline=None)
@given(spec=specs, steps=ops)
def test_same_events_same_decisions(spec: GroupSpec, steps: list[tuple[str, int, int]]) -> None:
    runs = []
    for _ in range(2):
        g = new_group("g", spec, at=0.0)
        out: list[GroupDecision] = []
        for i, op in enumerate(steps):
            out += handle(g, to_event(g, op, float(i)))
        runs.append((out, g.phase, g.attempt, g.members))
    assert runs[0] == runs[1]


def test_a_stop_ends_the_group_stopped_and_nothing_after_it() -> None:
    g = running(2, None, ["n0", "n1"])
    members = g.members
    assert handle(g, StopRequested("stopped on request", 5.0)) == []  # the shell stops the replicas itself
    assert g.phase == GroupPhase.STOPPED and g.members == () and g.last_members == members
    assert g.reason == "stopped on request"
    assert handle(g, MemberExited(0, 0, 1, 6.0)) == [] and handle(g, Tick(1000.0)) == [] and g.phase == GroupPhase.STOPPED
