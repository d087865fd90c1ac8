"""Clients of one role's HTTP API that several other roles use."""
