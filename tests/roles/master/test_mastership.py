"""The core when this master is removed from its run on chain (``MastershipChanged``): it invites
nobody (the nodes would refuse it: it is no master of the run), until it is added back."""

from __future__ import annotations

from prime.chain.types import ChainEvent
from prime.protocol.nodes import NodeState
from prime.roles.master.adoption import Adoption
from prime.roles.master.state import (
    MastershipChanged,
    NodeApprovedOnChain,
    RunEnded,
    SendInvite,
    Tick,
    handle,
    invite_is_current,
)
from tests.roles.master.test_state import SPECS, A, B, fresh, member, of


def test_a_removed_master_invites_nobody_until_it_is_added_back() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))           # invited until 100
    live = SendInvite(A, 100)
    assert of(handle(st, MastershipChanged(False, 10.0)), SendInvite) == []
    assert not st.may_invite and not invite_is_current(st, live)  # a queued invite is dropped
    for now in (150.0, 400.0):                                # expired: not sent again
        assert of(handle(st, Tick(now)), SendInvite) == []
    assert of(handle(st, NodeApprovedOnChain(B, SPECS, 20.0)), SendInvite) == []
    assert st.nodes[B].state == NodeState.APPROVED
    # Added back: both are invited again, as a master that caught up with the chain does.
    out = of(handle(st, MastershipChanged(True, 500.0)), SendInvite) + of(handle(st, Tick(501.0)), SendInvite)
    assert sorted(i.node for i in out) == sorted([A, B])
    assert st.may_invite


def test_a_removed_master_keeps_its_members_records() -> None:
    st = fresh()
    member(st, A)
    before = st.nodes[A].state
    handle(st, MastershipChanged(False, 10.0))  # where its nodes go is adoption's part (NodeLeftOnChain)
    assert st.nodes[A].state == before


def test_added_back_after_the_runs_end_it_still_invites_nobody() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))
    handle(st, RunEnded(1.0))
    handle(st, MastershipChanged(False, 2.0))
    assert of(handle(st, MastershipChanged(True, 3.0)), SendInvite) == []
    assert of(handle(st, Tick(200.0)), SendInvite) == []


# --- the shell: adoption.Adoption turns the run's MasterRemoved / MasterAdded into the core event


ME = "0x" + "11" * 20
OTHER = "0x" + "22" * 20
RUN = 3


def _event(name: str, master: str, block: int, run_id: int = RUN) -> ChainEvent:
    return ChainEvent(name, {"runId": run_id, "master": master}, block, "0x" + "00" * 32, 0)


def _adoption(st) -> Adoption:  # type: ignore[no-untyped-def]
    adoption = Adoption(None, RUN, ME, state=lambda: st, apply=lambda e: handle(st, e), invite=None,  # type: ignore[arg-type]
                        clock=lambda: 50.0)
    adoption.membership.apply(_event("MasterAdded", ME, 1))
    adoption.membership.apply(_event("MasterAdded", OTHER, 2))
    return adoption


def test_adoption_feeds_the_removal_and_the_return_of_this_master() -> None:
    st = fresh()
    adoption = _adoption(st)
    adoption.observe(_event("MasterRemoved", OTHER, 3))  # another master: nothing for this one
    assert st.may_invite
    adoption.observe(_event("MasterRemoved", ME, 4, run_id=RUN + 1))  # another run's event
    assert st.may_invite
    adoption.observe(_event("MasterRemoved", ME, 5))
    assert not st.is_master and not st.may_invite
    adoption.observe(_event("MasterAdded", ME, 5))  # a replay (not after the position): ignored
    assert not st.is_master
    adoption.observe(_event("MasterAdded", ME, 6))
    assert st.is_master and st.may_invite
