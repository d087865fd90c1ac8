"""Shared fixtures live in tests/fixtures/, one module per real part (chain, Docker, processes)."""

pytest_plugins = [
    "tests.fixtures.chain",
    "tests.fixtures.docker",
    "tests.fixtures.processes",
    "tests.fixtures.servers",
    "tests.fixtures.report",
]
