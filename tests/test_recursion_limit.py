"""py_ecc's recursion limit (100,000) is undone for the whole process (prime/__init__.py).

In a fresh interpreter (the limit is process-wide), whatever the import order: importing
prime, web3, eth_account and the role apps leaves the limit at CPython's default, and
100,000-deep JSON raises instead of overflowing the C stack (SIGSEGV).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent("""
    import json, sys
    {imports}
    import prime.roles.master.app, prime.roles.miner.app, prime.roles.validator.service, prime.roles.discovery.app
    import web3, eth_account, py_ecc
    assert sys.getrecursionlimit() <= 1000, sys.getrecursionlimit()
    import msgspec
    from prime.protocol.codec import ValidationError, parse
    deep = b"[" * 100_000 + b"]" * 100_000
    for attempt in (lambda: json.loads(deep), lambda: msgspec.json.decode(deep)):
        try:
            attempt()
        except RecursionError:
            pass
        else:
            raise AssertionError("deep JSON parsed")
    try:
        parse(deep)
    except ValidationError:
        pass
    print("alive", sys.getrecursionlimit())
""")


@pytest.mark.parametrize("imports", [
    "import prime",
    "import web3\nimport prime",  # py_ecc imported (and the limit raised) before prime
    "from eth_account import Account\nimport prime.protocol.codec",
])
def test_the_limit_stays_at_the_default_and_deep_json_raises(imports: str) -> None:
    done = subprocess.run([sys.executable, "-c", CHECK.format(imports=imports)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["alive", "1000"]
