"""The master role: coordinates one run.

Pure core (no I/O): ``models`` (wire messages, validation), ``state`` (the state machine and the
one reconciliation function), ``scheduler`` (placement), ``store`` (SQLite persistence).

Service around it: ``service`` (drives the core, carries out its instructions), ``chainwatch``
(registry events -> state events), ``invites`` (signed invites and their acknowledgements),
``locator`` (node URLs from discovery), ``dispatch`` (task pushes to miners), ``logs`` (merged
log streams), ``sync`` + ``cas`` (storage sync into a content-addressed store), ``metrics``,
``app`` (HTTP API), ``server`` (startup wiring) and ``cli`` (``prime master start|nodes``).
"""
