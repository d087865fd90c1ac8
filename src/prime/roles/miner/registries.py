"""Which image registries a miner pulls from.

A task's image name is the buyer's choice, but the pull is made by the miner host's Docker
daemon: without a check, ``127.0.0.1:6379/x`` or ``10.0.0.5:80/x`` makes that daemon connect to
a service on the miner's own host or network. So before any pull the executor asks a
``RegistryPolicy``:

- no ``--allow-registry`` (the default): registries named by a public DNS name are allowed;
  IP literals (in any notation a resolver would accept), local names (``localhost``,
  ``*.local``, ``*.internal``, …) and names that resolve to a non-public address
  (loopback, link-local, private, unspecified, multicast, reserved) are refused. Docker Hub
  (``docker.io``) is allowed without a lookup: Docker maps it to its own fixed hosts.
- with ``--allow-registry HOST[:PORT]`` (repeatable, or PRIME_ALLOW_REGISTRY comma separated):
  exactly the listed registries, and nothing else (list ``docker.io`` for Docker Hub);
  ``*.example.org`` allows every name under example.org. The operator's explicit choice may
  name a loopback or private registry; no lookup is made then.

The registry of a reference is parsed as Docker parses it (distribution/reference): the first
path component is a registry only if it contains "." or ":", is "localhost", or has an
uppercase letter; otherwise the image is on Docker Hub.

The lookup is a best effort, not a guarantee: a name may resolve differently moments later
when the daemon connects (DNS rebinding), or on another host when DOCKER_HOST is remote. An
operator who needs certainty lists the registries.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prime.errors import ConfigError

DOCKER_HUB = "docker.io"
FLAG = "--allow-registry"
ENV = "PRIME_ALLOW_REGISTRY"

# distribution/reference's grammar (regexp.go), ASCII only like Go's regexp.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_HOST = rf"(?:{_DOMAIN_NAME}|\[[a-fA-F0-9:]+\])"
_DOMAIN_AND_PORT = rf"{_HOST}(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REMOTE_NAME = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_REFERENCE = re.compile(
    rf"(?P<name>(?:{_DOMAIN_AND_PORT}/)?{_REMOTE_NAME})(?::[\w][\w.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?",
    re.ASCII,
)
_ENTRY = re.compile(rf"(?:\*\.)?{_DOMAIN_AND_PORT}", re.ASCII)
NAME_MAX = 255  # distribution/reference's NameTotalLengthMax
REFERENCE_MAX = 1024  # name, a 128-character tag and a digest fit; longer input is not even matched

# Names that never mean a public registry; their lookups would answer from the local network.
LOCAL_SUFFIXES = ("localhost", "local", "localdomain", "internal", "lan", "intranet", "home.arpa")

Resolver = Callable[[str, int], list[str]]


class InvalidImageReference(ValueError):
    """Not an image reference Docker would accept."""


def registry_of(image: str) -> str:
    """The registry (``host`` or ``host:port``, as written) Docker pulls ``image`` from;
    ``docker.io`` for Docker Hub. Raises ``InvalidImageReference``."""
    if len(image) > REFERENCE_MAX or _REFERENCE.fullmatch(image) is None:
        raise InvalidImageReference(f"'{image[:300]}' is not a valid Docker image reference")
    first, slash, rest = image.partition("/")
    if not slash or not (any(c in first for c in ".:") or first == "localhost" or first.lower() != first):
        domain, remote = DOCKER_HUB, image
    else:
        domain, remote = first, rest
    if domain == "index.docker.io":  # Docker's legacy name of Docker Hub
        domain = DOCKER_HUB
    elif domain != DOCKER_HUB and not re.fullmatch(_DOMAIN_AND_PORT, domain, re.ASCII):
        # e.g. "ex_ample.com/x": Docker takes the first component for a registry, then its grammar
        # reads the whole as a path; refused rather than guessed.
        raise InvalidImageReference(f"'{image[:300]}' is not a valid Docker image reference ({domain[:100]!r} is not a registry name)")
    name = remote.split("@", 1)[0]
    name = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    if len(domain) + 1 + len(name) > NAME_MAX:
        raise InvalidImageReference(f"'{image[:300]}…' is not a valid Docker image reference (a name is at most {NAME_MAX} characters)")
    return domain


def split_registry(registry: str) -> tuple[str, int | None]:
    """("host", port or None) of ``host[:port]``; an IPv6 host keeps its brackets."""
    if registry.startswith("["):
        host, _, rest = registry.partition("]")
        return host + "]", int(rest[1:]) if rest.startswith(":") else None
    host, colon, port = registry.rpartition(":")
    return (host, int(port)) if colon else (registry, None)


def _is_ip_literal(host: str) -> bool:
    """Whether a resolver would read ``host`` as an address rather than a name.

    Beyond dotted quads, C's inet_aton (and so getaddrinfo) accepts 127.1, 0x7f.0.0.1,
    0177.0.0.1 and 2130706433; a name whose last label is a number is read as an address by
    URL parsers too, and no top-level domain is numeric. So: bracketed, or last label numeric.
    """
    if host.startswith("["):
        return True
    last = host.rstrip(".").rsplit(".", 1)[-1].lower()
    return bool(re.fullmatch(r"[0-9]+|0x[0-9a-f]*", last, re.ASCII))


def _is_local_name(host: str) -> bool:
    name = host.rstrip(".").lower()
    return any(name == suffix or name.endswith("." + suffix) for suffix in LOCAL_SUFFIXES)


def address_refusal(addresses: Iterable[str]) -> str | None:
    """Why a registry resolving to ``addresses`` is refused (None: all public). One
    non-public address is enough: the daemon may connect to any of them."""
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone id is not part of the address
        except ValueError:
            return f"it resolves to {text!r}, which is not an address"
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):  # most telling first
            if getattr(address, f"is_{kind}"):
                return f"it resolves to {address}, a {kind.replace('_', '-')} address"
        if not address.is_global:  # e.g. 100.64.0.0/10, shared carrier-grade NAT space
            return f"it resolves to {address}, which is not a public address"
    return None


def system_resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to on this machine (as the daemon's resolver would)."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


@dataclass(frozen=True)
class Entry:
    """One --allow-registry entry: a registry (host[:port]), or ``*.suffix[:port]``."""

    host: str  # lowercase; without "*." for a wildcard
    port: int | None
    wildcard: bool

    @classmethod
    def parse(cls, text: str) -> Entry:
        raw = text.strip()
        if "://" in raw or "/" in raw:
            raise ConfigError(f"{FLAG} {raw!r}: write a registry as in image names (host or host:port, e.g. ghcr.io or 127.0.0.1:5000), without a scheme or path.")
        if not _ENTRY.fullmatch(raw):
            raise ConfigError(f"{FLAG} {raw!r} is not a registry name (host or host:port, or *.example.org for every name under it).")
        wildcard = raw.startswith("*.")
        host, port = split_registry(raw[2:] if wildcard else raw)
        host = host.lower()
        return cls(DOCKER_HUB if host == "index.docker.io" else host, port, wildcard)

    def matches(self, host: str, port: int | None) -> bool:
        if port != self.port:  # ghcr.io does not allow ghcr.io:8443: a registry is named with its port
            return False
        host = host.lower()
        return host.endswith("." + self.host) if self.wildcard else host == self.host


def parse_entries(values: Iterable[str]) -> tuple[Entry, ...]:
    """The flag's values (each may hold several, comma separated); empty ones are skipped."""
    return tuple(Entry.parse(part) for value in values for part in value.split(",") if part.strip())


class RegistryPolicy:
    """Decides whether the executor may pull an image. ``entries`` empty: the default policy."""

    def __init__(
        self,
        entries: Iterable[Entry] = (),
        *,
        resolve: Resolver = system_resolve,
        resolve_timeout_s: float = 2.0,
        cache_s: float = 30.0,
        max_lookups: int = 8,
    ) -> None:
        self.entries = tuple(entries)
        self.resolve = resolve
        self.resolve_timeout_s = resolve_timeout_s
        self.cache_s = cache_s
        self.max_lookups = max_lookups
        self._cache: OrderedDict[tuple[str, int | None], tuple[float, str | None]] = OrderedDict()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    @classmethod
    def from_flags(cls, values: Iterable[str], *, resolve: Resolver = system_resolve) -> RegistryPolicy:
        """The policy of ``--allow-registry`` values (none: the default); ConfigError for a bad one."""
        return cls(parse_entries(values), resolve=resolve)

    def describe(self) -> str:
        """One line for the miner's log: which registries it pulls from."""
        if not self.entries:
            return "public registries only (no IP literals, local names or private addresses)"
        return "only " + ", ".join(("*." if e.wildcard else "") + e.host + ("" if e.port is None else f":{e.port}") for e in self.entries)

    async def check(self, image: str) -> str | None:
        """None when ``image`` may be pulled, else the task error: one sentence naming the registry,
        why it is refused, and the flag that would allow it. Never raises."""
        try:
            registry = registry_of(image)
        except InvalidImageReference as exc:
            return f"{exc}, so this miner does not pull it"
        why = await self._refusal(registry)
        if why is None:
            return None
        return (
            f"image '{image}' names registry {registry}, which this miner does not pull from ({why}); "
            f"the miner's operator can allow it with {FLAG} {registry}"
        )

    async def _refusal(self, registry: str) -> str | None:
        host, port = split_registry(registry)
        if self.entries:  # the operator's list, and only it
            return None if any(e.matches(host, port) for e in self.entries) else f"it is not listed in {FLAG}"
        if _is_ip_literal(host):
            return "an IP literal"
        if _is_local_name(host):
            return "a local name"
        if host.lower() == DOCKER_HUB:
            return None
        return await self._lookup(host.lower(), port)

    async def _lookup(self, host: str, port: int | None) -> str | None:
        now = time.monotonic()
        cached = self._cache.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            addresses = await asyncio.wait_for(self._resolve_in_thread(host, port or 443), self.resolve_timeout_s)
        except TimeoutError:
            why: str | None = f"its name did not resolve within {self.resolve_timeout_s:g} s, so where it points could not be checked"
        except _Busy:
            return "too many registry names are being looked up at once; it is checked again at the next try"
        except OSError as exc:
            why = f"its name did not resolve ({exc.strerror or exc}), so where it points could not be checked"
        else:
            why = address_refusal(addresses) if addresses else "its name resolves to no address"
        self._cache[(host, port)] = (now + self.cache_s, why)
        self._cache.move_to_end((host, port))
        while len(self._cache) > 256:
            self._cache.popitem(last=False)
        return why

    async def _resolve_in_thread(self, host: str, port: int) -> list[str]:
        """The resolver in a daemon thread of its own: a lookup that hangs past the timeout
        keeps no worker of the shared pool (the Docker calls' pool) busy, and at most
        ``max_lookups`` such threads exist at once."""
        with self._in_flight_lock:
            if self._in_flight >= self.max_lookups:
                raise _Busy
            self._in_flight += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[str]] = loop.create_future()

        def settle(result: list[str] | None, error: BaseException | None) -> None:
            if future.done():  # timed out meanwhile
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result or [])

        def work() -> None:
            try:
                result, error = self.resolve(host, port), None
            except Exception as exc:
                result, error = None, exc
            finally:
                with self._in_flight_lock:
                    self._in_flight -= 1
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop closed meanwhile: nobody waits for the answer
                pass

        threading.Thread(target=work, name=f"prime-resolve-{host[:40]}", daemon=True).start()
        return await future


class _Busy(Exception):
    """More lookups in flight than the policy allows."""
