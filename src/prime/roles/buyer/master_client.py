"""The buyer's side of the master's owner API (signed by the run owner's key).

Every call goes through ``SignedClient``; every failure becomes one ``PrimeError`` sentence
that says what to do (master unreachable, not the run's owner, a spec the master refused...).
Downloads verify size and sha256 while streaming and only then move the file into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from yarl import URL

from prime.auth.client import SignedClient
from prime.auth.transport import Transport
from prime.errors import PeerError, PrimeError
from prime.protocol.codec import parse
from prime.protocol.errors import ValidationError
from prime.protocol.storage import validate_relative_path
from prime.protocol.tasks import is_task_id

CHUNK = 256 * 1024
# The owner's own master may list many tasks with large specs: a larger bound than peers get.
MAX_ANSWER_BYTES = 64 * 1024 * 1024

# The longest log line read from the master (its own lines are at most 1 MiB of text, as JSON).
MAX_LOG_LINE_BYTES = 8 * 1024 * 1024


class MasterRefused(PrimeError):
    """The master will not serve this key (401 bad signature / 403 not the run's owner)."""


class MasterUnreachable(PrimeError):
    """No answer from the master (connection refused, timeout)."""


class MasterClient:
    """Owner calls to one master: ``async with MasterClient.open(account, url) as master: ...``."""

    def __init__(self, client: SignedClient, base_url: str) -> None:
        self._client = client
        self.base_url = normalize_master_url(base_url)
        self._base = URL(self.base_url)
        self._master: str | None = None  # the master's address, learned from its /health on first use

    async def _audience(self) -> str:
        """The master's address: requests are addressed to it, and its answers must be signed by it."""
        if self._master is None:
            self._master = (await self._client.identify(self.base_url)).address
        return self._master

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, account: Any, base_url: str, *, timeout_s: float = 10.0, retries: int = 2, transport: Transport | None = None
    ) -> AsyncIterator[MasterClient]:
        """``transport``: how to reach the master (default: real sockets; tests pass an InProcessTransport)."""
        async with SignedClient(account, timeout_s=timeout_s, retries=retries, max_response_bytes=MAX_ANSWER_BYTES,
                                transport=transport) as client:
            yield cls(client, base_url)

    @property
    def signer(self) -> str:
        return self._client.account.address

    def _url(self, *parts: str) -> URL:
        # joinpath percent-encodes each part, so a file path with spaces or '%' stays one path.
        return self._base.joinpath(*parts)

    async def _call(self, method: str, what: str, *parts: str, json_body: Any = None, params: dict | None = None) -> Any:
        try:
            return await self._client.request(method, self._url(*parts), audience=await self._audience(), json=json_body, params=params)
        except PeerError as exc:
            raise self.explain(exc, what) from None

    # -- tasks -------------------------------------------------------------------------------

    async def create_task(self, spec: dict[str, Any]) -> dict[str, Any]:
        answer = await self._call("POST", "create the task", "tasks", json_body=spec)
        return self._expect_task(answer, "POST /tasks")

    async def list_tasks(self) -> list[dict[str, Any]]:
        answer = await self._call("GET", "list the tasks", "tasks")
        return self._expect_list(answer, "tasks", "GET /tasks")

    async def get_task(self, task_id: str) -> dict[str, Any]:
        check_task_id(task_id)
        return self._expect_task(await self._call("GET", f"read task {task_id}", "tasks", task_id), f"GET /tasks/{task_id}")

    async def stop_task(self, task_id: str) -> dict[str, Any] | None:
        check_task_id(task_id)
        answer = await self._call("DELETE", f"stop task {task_id}", "tasks", task_id)
        return answer if isinstance(answer, dict) else None

    async def nodes(self) -> list[dict[str, Any]]:
        answer = await self._call("GET", "list the nodes", "nodes")
        return self._expect_list(answer, "nodes", "GET /nodes")

    # -- logs --------------------------------------------------------------------------------

    async def logs(self, task_id: str, *, follow: bool = False, tail: int | None = None, replica: int | None = None,
                   attempt: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The task's log lines as the master keeps them: {"replica","attempt","node","stream","line","ts","seq"}
        (``replica``/``attempt``: only those).

        With ``follow`` the stream stays open until the master ends it (the task finished) or
        the caller stops iterating. A line that is not JSON comes through as {"line": text}.
        """
        check_task_id(task_id)
        params: dict[str, Any] = {"follow": 1 if follow else 0}
        if tail is not None:
            params["tail"] = tail
        if replica is not None:
            params["replica"] = replica
        if attempt is not None:
            params["attempt"] = attempt
        try:
            # No read timeout while following: a quiet task may print nothing for hours.
            async with self._client.stream(
                "GET", self._url("tasks", task_id, "logs"), audience=await self._audience(), params=params,
                read_timeout_s=None if follow else self._client.timeout_s,
            ) as response:
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    if len(buffer) > MAX_LOG_LINE_BYTES:  # a line that never ends: shown cut, not held
                        lines.append(buffer)
                        buffer = b""
                    for raw in lines:
                        if raw.strip():
                            yield parse_log_line(raw)
                if buffer.strip():
                    yield parse_log_line(buffer)
        except PeerError as exc:
            raise self.explain(exc, f"read the logs of task {task_id}") from None
        except (OSError, TimeoutError) as exc:
            raise PrimeError(f"The log stream of task {task_id} from the master at {self.base_url} broke off ({type(exc).__name__}); run the command again.") from None
        except Exception as exc:  # aiohttp payload errors while streaming
            if type(exc).__module__.startswith("aiohttp"):
                raise PrimeError(f"The log stream of task {task_id} from the master at {self.base_url} broke off ({type(exc).__name__}); run the command again.") from None
            raise

    # -- files -------------------------------------------------------------------------------

    async def files(self, task_id: str) -> list[dict[str, Any]]:
        check_task_id(task_id)
        answer = await self._call("GET", f"list the files of task {task_id}", "tasks", task_id, "files")
        return self._expect_list(answer, "files", f"GET /tasks/{task_id}/files")

    async def download(self, task_id: str, entry: dict[str, Any], target: Path, on_bytes: Callable[[int], None] | None = None) -> bool:
        """Fetch one synced file to ``target``, checking size and sha256; False if it was already there.

        ``on_bytes(n)`` after each chunk written (a progress bar's advance)."""
        check_task_id(task_id)
        path, size, digest, replica = _entry_fields(entry)
        if target.is_file() and target.stat().st_size == size and sha256_file(target) == digest:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        hasher = hashlib.sha256()
        received = 0
        try:
            async with self._client.stream(
                "GET", self._url("tasks", task_id, "files", *path.split("/")), audience=await self._audience(), params={"replica": replica}
            ) as response:
                with open(tmp, "wb") as out:
                    async for chunk in response.content.iter_chunked(CHUNK):
                        received += len(chunk)
                        if received > size:
                            break
                        hasher.update(chunk)
                        out.write(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
            if received != size or hasher.hexdigest() != digest:
                raise PrimeError(
                    f"The master sent {path} (replica {replica}) with a different "
                    f"{'size' if received != size else 'sha256'} than its file list says; nothing was saved, run the command again."
                )
            os.replace(tmp, target)
        except PeerError as exc:
            raise self.explain(exc, f"download {path} of task {task_id}") from None
        except OSError as exc:
            raise PrimeError(f"Cannot write {target} ({exc.strerror or exc}); choose a writable --download directory.") from None
        finally:
            tmp.unlink(missing_ok=True)
        return True

    # -- answers and errors ------------------------------------------------------------------

    def _expect_task(self, answer: Any, what: str) -> dict[str, Any]:
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str):
            raise PrimeError(f"The master at {self.base_url} answered {what} with something that is not a task; check that --master-url points at a prime master.")
        return answer

    def _expect_list(self, answer: Any, key: str, what: str) -> list[dict[str, Any]]:
        items = answer.get(key) if isinstance(answer, dict) else answer
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise PrimeError(f"The master at {self.base_url} answered {what} with something that is not a list of {key}; check that --master-url points at a prime master.")
        return items

    def explain(self, exc: PeerError, what: str) -> PrimeError:
        """One sentence for a failed call, with what to do about it."""
        status, body = exc.status, exc.body
        detail = body.get("detail") if isinstance(body, dict) else None
        error = body.get("error") if isinstance(body, dict) else None
        if status is not None and 200 <= status < 300:  # an answer that was not used (unsigned, too large, not JSON)
            return PrimeError(f"{exc} Could not {what}.")
        if status is None:
            return MasterUnreachable(
                f"Cannot reach the master at {self.base_url} to {what}; check --master-url (or PRIME_MASTER_URL) and that the master is running."
            )
        if status == 401:
            return MasterRefused(f"The master at {self.base_url} did not accept this request's signature ({_text(detail) or 'unauthorized'}); check this machine's clock.")
        if status == 403:
            return MasterRefused(
                f"The master at {self.base_url} refused to {what}: {self.signer} is not the owner of its run; "
                "use the run owner's key (--key-file)."
            )
        if status == 404:
            return PrimeError(f"The master at {self.base_url} cannot {what}: {_text(detail) or 'not found'}; check the id with `prime buyer tasks`.")
        if status in (400, 409, 413, 422):
            return PrimeError(f"The master refused to {what}: {_field_detail(detail) or error or 'bad request'}.")
        if status == 503 and error == "chain_unavailable":  # the master is up; its chain RPC is not
            return PrimeError(
                f"The master at {self.base_url} is running but cannot reach the chain to check this request's "
                f"permissions, so it cannot {what} right now; try again when the chain RPC answers."
            )
        if status == 503:
            return PrimeError(f"The master at {self.base_url} cannot {what} right now ({_text(detail) or error or 'unavailable'}); try again shortly.")
        return PrimeError(f"The master at {self.base_url} failed to {what} (HTTP {status}: {_text(detail) or error or 'no details'}).")


def _text(value: Any) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.rstrip(".")


def _field_detail(detail: Any) -> str:
    """The master's ValidationError detail {"field","message"} as "field: message"."""
    if isinstance(detail, dict) and "field" in detail and "message" in detail:
        return f"{detail['field']}: {str(detail['message']).rstrip('.')}"
    return _text(detail)


def normalize_master_url(url: str | None) -> str:
    if not url:
        raise PrimeError("No master URL given; pass --master-url or set PRIME_MASTER_URL (for the devnet: source .devnet/env).")
    try:
        parsed = URL(url.strip())
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise PrimeError(f"--master-url {url!r} is not an http(s) URL; write it like http://127.0.0.1:8092.")
    return str(parsed).rstrip("/")


def check_task_id(task_id: str) -> None:
    if not is_task_id(task_id):
        raise PrimeError(f"{task_id!r} is not a task id; task ids are the short ids `prime buyer tasks` lists.")


def parse_log_line(raw: bytes) -> dict[str, Any]:
    """One NDJSON line of the master's log stream; anything else (not JSON, nested past
    codec.MAX_DEPTH, a lone surrogate no terminal can print) comes through as {"line": text}."""
    raw = raw[:MAX_LOG_LINE_BYTES].rstrip(b"\r")
    text = raw.decode("utf-8", "replace")
    try:
        value = parse(raw)
    except ValidationError:
        return {"line": text}
    return value if isinstance(value, dict) else {"line": text}


def _entry_fields(entry: dict[str, Any]) -> tuple[str, int, str, int]:
    try:
        path = validate_relative_path(entry.get("path"))
        size, digest, replica = int(entry["size"]), str(entry["sha256"]).lower(), int(entry.get("replica", 0))
    except (ValidationError, KeyError, TypeError, ValueError):
        raise PrimeError(f"The master listed a file entry prime cannot use ({str(entry)[:120]}); report it to the master's operator.") from None
    if len(digest) != 64 or size < 0:
        raise PrimeError(f"The master listed {path} with an invalid size or sha256; report it to the master's operator.")
    return path, size, digest, replica


def download_target(directory: Path, entry: dict[str, Any], *, per_replica: bool) -> Path:
    """Where a listed file goes under ``directory``: ``<dir>/<path>``, or ``<dir>/replica-N/<path>``
    when the task's files come from several replicas. Never outside ``directory``."""
    path, _size, _digest, replica = _entry_fields(entry)
    base = directory / f"replica-{replica}" if per_replica else directory
    target = base / path
    root = directory.resolve()
    if not target.resolve().is_relative_to(root):  # a symlink planted in the directory
        raise PrimeError(f"{target} would be written outside {directory}; remove the link there or choose an empty directory.")
    return target


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()
