"""The master service noticing a gap in its own view (issue 13): its tick loop (real clock, fake
time) stalls or the clock jumps; nobody is judged for it, it is logged once at WARNING, and a node
that stays silent afterwards is still judged a full window later."""

from __future__ import annotations

import logging

from eth_account import Account

from tests.roles.master.test_service_inprocess import Master, master  # noqa: F401  (the fixture)


async def test_a_stalled_tick_restarts_the_windows_and_is_logged_once(master: Master, caplog) -> None:  # noqa: F811
    node = Account.create()
    master.member(node)
    assert (await master.heartbeat(node))[0] == 200
    every = master.service.settings.tick_interval_s
    assert every == 0.4  # heartbeat 10 s: Unhealthy after 21 s, Dead after 51 s
    await master.service.tick()
    with caplog.at_level(logging.INFO, logger="prime.master"):
        master.clock.now += 300.0   # the loop stalled (or the process was paused) for 300 s
        await master.service.tick()
    gaps = [r for r in caplog.records if "gap" in r.getMessage()]
    assert len(gaps) == 1 and gaps[0].levelname == "WARNING" and gaps[0].exc_info is None
    assert not [r for r in caplog.records if "->" in r.getMessage()]  # no node transition
    assert master.service.state.nodes[node.address].state.value == "Healthy"

    states = []
    for _ in range(150):  # ticks on time again (60 s); the node stays silent
        master.clock.now += every
        await master.service.tick()
        states.append(master.service.state.nodes[node.address].state.value)
    assert states[:50] == ["Healthy"] * 50                      # 20 s after the gap: within the window
    assert "Unhealthy" in states and states[-1] == "Dead"       # 60 s after: judged as usual
    assert len([r for r in caplog.records if "gap" in r.getMessage()]) == 1
