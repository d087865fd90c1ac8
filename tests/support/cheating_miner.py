"""A real miner whose challenge prover cheats: ``python -m tests.support.cheating_miner
--mode garbage|inconsistent|slow [--delay-s S] <the same arguments as prime miner start>``.

Everything but the prover is the real miner (registration, discovery, invites, heartbeats,
tasks), so end-to-end tests see exactly what a validator sees from a dishonest node:

- ``garbage``: commits to a product with 10 % of its entries wrong (caught by recomputing entries);
- ``inconsistent``: commits to a random root and opens rows whose paths do not match it
  (caught by the Merkle check);
- ``slow``: honest, but sleeps ``--delay-s`` seconds (default 5) before committing (caught
  by the time bound).

Run it from the repository root (the ``tests`` package must be importable).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

MODES = ("garbage", "inconsistent", "slow")


def make_prover(mode: str, delay_s: float = 5.0) -> Any:
    """The cheating prover for ``mode`` (from tests/challenge/cheaters.py)."""
    from tests.challenge.cheaters import CorruptingProver, LazyProver, SlowProver

    if mode == "garbage":
        return CorruptingProver(fraction=0.10)
    if mode == "inconsistent":
        return LazyProver()
    if mode == "slow":
        return SlowProver(delay_s=delay_s)
    raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.cheating_miner", add_help=True)
    parser.add_argument("--mode", required=True, choices=MODES, help="how the prover cheats")
    parser.add_argument("--delay-s", type=float, default=5.0, help="seconds the slow prover sleeps before committing")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from prime.roles.miner.cli import main_with_prover

    main_with_prover(rest, make_prover(known.mode, known.delay_s))


if __name__ == "__main__":
    main()
