"""Helpers that tests run as real processes (e.g. a miner with a cheating prover)."""
