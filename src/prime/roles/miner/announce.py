"""Telling discovery where the node listens, and again whenever that changes.

The address is ``--public-ip`` when given (behind NAT nothing else is right); else the
``--host`` the miner listens on when that is one specific address; else the address of
the interface this machine would use to reach the discovery service, found by
"connecting" a UDP socket, which picks a route and sends nothing.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from prime.errors import PrimeError

log = logging.getLogger(__name__)

# TEST-NET-1 / documentation prefix: routable-looking, never answered; only used to pick a route.
_FALLBACK_TARGETS = (("192.0.2.1", 9), ("2001:db8::1", 9))


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host in ("", "*")


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def outbound_ip(target_host: str | None, target_port: int = 80) -> str | None:
    """The local address the kernel would use to reach ``target_host`` (no packet is sent)."""
    targets: list[tuple[str, int]] = []
    if target_host:
        try:
            for family, _, _, _, address in socket.getaddrinfo(target_host, target_port, type=socket.SOCK_DGRAM):
                host, port = address[0], address[1]
                if isinstance(host, str) and isinstance(port, int):  # IPv4/IPv6 (host, port, ...); not (int, bytes)
                    targets.append((host, port))
        except (socket.gaierror, UnicodeError):
            pass
    targets.extend(_FALLBACK_TARGETS)
    for host, port in targets:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((host, port))  # UDP connect: route lookup only
                local = sock.getsockname()[0]
        except OSError:
            continue
        ip = ipaddress.ip_address(local.split("%", 1)[0])
        if not ip.is_unspecified:
            return str(ip)
    return None


def choose_announce_ip(public_ip: str | None, listen_host: str, discovery_url: str) -> str:
    """The IP to announce (see the module docstring); ``PrimeError`` when none can be found."""
    if public_ip:
        literal = _literal(public_ip.strip())
        if literal is None:
            raise PrimeError(f"--public-ip {public_ip!r} is not an IPv4 or IPv6 address; give the address other machines reach this node at.")
        if ipaddress.ip_address(literal).is_unspecified:
            raise PrimeError(f"--public-ip {public_ip} is a wildcard address; give the address other machines reach this node at.")
        return literal
    if not _is_wildcard(listen_host):
        literal = _literal(listen_host)
        if literal is not None:
            return literal
    detected = outbound_ip(urlsplit(discovery_url).hostname)
    if detected is None:
        raise PrimeError("Could not find this machine's network address; pass the address other machines reach it at with --public-ip.")
    return detected


@dataclass
class AnnounceResult:
    ip: str
    port: int
    at: float


class Announcer:
    """One step per tick: announce when the address changed or ``every_s`` has passed.

    ``announce(ip, port)`` does the signed PUT (DiscoveryClient.announce bound to the run);
    ``resolve_ip()`` gives the current address (cheap: a route lookup).
    """

    def __init__(
        self,
        announce: Callable[[str, int], Awaitable[object]],
        resolve_ip: Callable[[], str],
        port: int,
        *,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_announced: Callable[[AnnounceResult], Awaitable[None] | None] | None = None,
    ) -> None:
        self._announce = announce
        self._resolve_ip = resolve_ip
        self.port = port
        self.every_s = every_s
        self._clock = clock
        self._on_announced = on_announced
        self.last_ip: str | None = None
        self._last_at: float | None = None

    def due(self, ip: str) -> bool:
        if self.last_ip != ip or self._last_at is None:
            return True
        return self._clock() - self._last_at >= self.every_s

    async def step(self) -> bool:
        """Announce if due; True when it announced. Raises (PeerError...) so the loop backs off."""
        ip = self._resolve_ip()
        if not self.due(ip):
            return False
        if self.last_ip is not None and ip != self.last_ip:
            log.info("the node's address changed from %s to %s; announcing it", self.last_ip, ip)
        await self._announce(ip, self.port)
        self.last_ip = ip
        self._last_at = self._clock()
        if self._on_announced is not None:
            done = self._on_announced(AnnounceResult(ip, self.port, time.time()))
            if inspect.isawaitable(done):
                await done
        return True
