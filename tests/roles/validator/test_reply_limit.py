"""The bound on a miner's answer to a challenge: room for every opened row, never unbounded."""

from __future__ import annotations

from prime.auth.client import DEFAULT_MAX_RESPONSE_BYTES
from prime.challenge.params import plan_challenge
from prime.protocol.challenge import MAX_N
from prime.roles.validator.service import opened_rows_limit
from tests.roles.validator.support import CPU_SPECS


def test_the_limit_fits_every_opened_row_as_json_and_stays_bounded():
    for n in (64, 8192, MAX_N):
        plan = plan_challenge(CPU_SPECS, {"n": n, "repeat": 1})
        limit = opened_rows_limit(plan)
        # k rows of n numbers, each at most 24 characters and a comma as JSON text
        assert limit >= DEFAULT_MAX_RESPONSE_BYTES + plan.k * n * 25
        assert limit < 256 * 1024 * 1024
