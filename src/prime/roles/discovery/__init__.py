"""The discovery role: the address book where nodes announce where they listen.

- ``app.py``: the aiohttp service (PUT /nodes, GET /nodes/{address}, GET /runs/{run_id}/nodes).
- ``store.py``: the SQLite address book behind it.
- ``client.py``: ``DiscoveryClient`` and ``NodeAddress``, what every other role uses to talk to it.
- ``cli.py``: ``prime discovery start``.
"""
