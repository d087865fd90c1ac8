"""The validator role: challenge every newly registered node and write approve/reject on chain.

- ``service.py``: the loops (follow NodeRegistered, dispatch validations) and ``serve``.
- ``verdict.py``: pure logic: verdicts, reasons naming the failed check, retry timing.
- ``store.py``: SQLite: the chain cursor and one row per registration (restart-safe).
- ``cli.py``: ``prime validator start`` and ``prime validator reports``.
"""
