"""The app keys every role's app carries (set by ``make_app``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from prime.web.health import Identity, LoopHealth

APP_NAME = web.AppKey("prime.name", str)
HEALTH: web.AppKey[LoopHealth] = web.AppKey("prime.health")
IDENTITY: web.AppKey[Identity] = web.AppKey("prime.identity")
METRICS = web.AppKey("prime.metrics", CollectorRegistry)
DEFAULT_CLIENT_MAX_SIZE = 64 * 1024
