"""prime: a verifiable compute pool for AI training on GPUs owned by strangers."""

from __future__ import annotations

import sys

__version__ = "0.1.0"

# py_ecc (imported by eth_account and web3) raises the interpreter's recursion limit to 100,000
# when it is first imported (py_ecc/__init__.py). With that limit a deeply nested JSON body
# (``[[[...]]]``, 100,000 levels fit in 200 KB) overflows the C stack inside json.loads or
# msgspec and kills the process (SIGSEGV) instead of raising RecursionError. prime never
# needs that depth (py_ecc's pairing code is not used), so py_ecc is imported here, once, and
# the limit it set is undone for the whole process. Later imports of py_ecc do not run its
# __init__ again. Tests: tests/test_recursion_limit.py.
PY_ECC_RECURSION_LIMIT = 100_000
SAFE_RECURSION_LIMIT = 1000  # CPython's default


def _neutralise_py_ecc_recursion_limit() -> None:
    before = sys.getrecursionlimit()
    try:
        import py_ecc  # noqa: F401  (imported for its side effect, which is undone below)
    except ImportError:  # pragma: no cover - py_ecc comes with eth_account; nothing to undo without it
        return
    if sys.getrecursionlimit() >= PY_ECC_RECURSION_LIMIT:
        # ``before`` is py_ecc's own value when something imported it before prime.
        sys.setrecursionlimit(before if before < PY_ECC_RECURSION_LIMIT else SAFE_RECURSION_LIMIT)


_neutralise_py_ecc_recursion_limit()
