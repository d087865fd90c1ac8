"""Role packages: one per role, each an aiohttp app plus its background loops."""
