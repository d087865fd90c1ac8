"""Fixtures shared by the miner tests.

`discovery` (one discovery process for the session, its nodes told apart by run) is defined in
tests.support.miner_env; importing it here rather than into each test module lets pytest find it
without an import that a test's parameter of the same name then shadows.
"""

from tests.support.miner_env import discovery

__all__ = ["discovery"]
