"""The miner role."""
