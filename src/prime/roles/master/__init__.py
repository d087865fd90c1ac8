"""The master role: coordinates one run.

Pure core (no I/O): ``state`` (MasterState and ``handle``: events in, instructions out; task
admission, stops, the run ending), ``events`` (its vocabulary), ``lifecycle`` (node states and
invites, the one reconciliation function), ``scheduler`` (placement), ``syncplan`` (storage sync
decisions). Wire messages are in ``prime.protocol``.

Around it: ``service`` (drives the core; its effects, ``MasterEffects``, come in at construction),
``effects`` (the real ones), ``store`` (SQLite persistence), ``chainwatch`` (registry events ->
core events), ``invites`` (signed invites and their acknowledgements), ``locator`` (node URLs from
discovery), ``dispatch`` (task pushes to miners), ``logs`` (merged log streams), ``sync`` + ``cas``
(one storage sync into a content-addressed store), ``metrics``, ``app`` (HTTP API), ``server``
(start-up wiring) and ``cli`` (``prime master start|nodes``).
"""
