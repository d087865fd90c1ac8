"""Miner side HTTP surface: POST /challenge and POST /challenge/{id}/open.

One challenge at a time per node. Everything a request can get wrong (bad JSON, bad
fields, a size beyond the node's memory, a second challenge while one runs, an unknown
id, rows out of range) is answered 4xx JSON before anything is allocated. The one
exception to "one at a time" is the validator that holds the challenge asking again with a
new id (it restarted, or lost the answer): its committed challenge is replaced at once, and
one still computing is marked orphaned (409 until its thread ends, then freed at once rather
than held), so a restarted validator is answered within seconds; any other validator gets
409 while one runs, so no validator can queue work on a node or push another one's aside. Bodies are
decoded into the messages of prime.protocol.challenge, whose types are their validation:
anything they refuse is 400 ``invalid_body`` (raised as prime.web.ApiError, so the app
must have prime.web's error middleware, as every ``make_app`` app does). The matmul
runs in a worker thread so the event loop keeps serving /health and heartbeats. The
committed rows are held until they are opened or ``hold_s`` passes (twice the time it took
to compute them, at least ``MIN_OPEN_HOLD_S``, at most ``open_timeout_s``), then freed: a
validator opens right after the commitment arrives, so the hold only covers its reaction.
Every commitment names the GPUs that computed it (``gpu_uuids``, in the miner's ``--gpu``
order, and the ``driver``); a CPU node names none.

No chain and no signature logic here: ``add_challenge_routes`` wraps both handlers with
the ``require_validator`` decorator it is given (prime.auth.middleware.require(check)).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import msgspec
from aiohttp import web

from prime.challenge.params import ChallengeParams
from prime.challenge.prover import Commitment, MatmulProver, Prover
from prime.protocol.challenge import (
    MAX_BACKEND_LENGTH,
    MAX_ELAPSED_S,
    ChallengeRequest,
    CommitmentAnswer,
    DriverIdentity,
    GpuUuids,
    OpeningAnswer,
    OpenRequest,
    decoder,
    encode,
)
from prime.protocol.codec import Message
from prime.web import ApiError, Param, api, json_error

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_OPEN_TIMEOUT_S = 30.0  # the longest an unopened commitment is held
MIN_OPEN_HOLD_S = 10.0         # the shortest (unless open_timeout_s is shorter still)
DEFAULT_MAX_OPEN_ROWS = 4096


M = TypeVar("M", bound=Message)


async def _read(request: web.Request, message: type[M]) -> M:
    """The body as ``message``; 400 invalid_body naming what is wrong (413 past the app's limit)."""
    body = await request.read()
    try:
        return decoder(message).decode(body)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise ApiError(400, "invalid_body", str(exc)) from None


def _json(message: Message) -> web.Response:
    return web.Response(body=encode(message), content_type="application/json")


@dataclass
class _Active:
    params: ChallengeParams
    signer: str | None
    commitment: Commitment | None = None  # None while computing
    expiry: asyncio.TimerHandle | None = None
    orphaned: bool = False                 # its validator asked again: free it when the thread ends


class ChallengeService:
    """Holds at most one challenge: computing, then committed until opened or expired."""

    def __init__(self, prover: Prover | None = None, *, memory_limit_bytes: int | None = None,
                 open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S,
                 max_open_rows: int = DEFAULT_MAX_OPEN_ROWS,
                 gpu_uuids: Sequence[str] = (), driver: DriverIdentity | None = None) -> None:
        self.prover: Prover = prover or MatmulProver()
        # The probe's canonical UUIDs of the GPUs the prover computes on (hardware.identity),
        # checked against the message's bounds now rather than failing every challenge later.
        self.gpu_uuids = list(msgspec.convert(list(gpu_uuids), GpuUuids))
        if len(set(self.gpu_uuids)) != len(self.gpu_uuids):
            raise ValueError("gpu_uuids must be distinct")
        self.driver = driver if self.gpu_uuids else None
        self.memory_limit_bytes = memory_limit_bytes
        self.open_timeout_s = open_timeout_s
        self.max_open_rows = max_open_rows
        self._active: _Active | None = None
        self.completed = 0

    # ---------------------------------------------------------------- state
    @property
    def active_id(self) -> str | None:
        return self._active.params.id if self._active else None

    def holds_arrays(self) -> bool:
        """True while a computed C (or a computation) is held in memory."""
        return self._active is not None

    def release(self) -> None:
        """Drop the current challenge and its arrays."""
        if self._active and self._active.expiry:
            self._active.expiry.cancel()
        self._active = None

    def hold_s(self, compute_s: float) -> float:
        """How long a commitment computed in ``compute_s`` waits for its opening."""
        return min(self.open_timeout_s, max(MIN_OPEN_HOLD_S, 2.0 * compute_s))

    def _expire(self, active: _Active, hold_s: float) -> None:
        if self._active is active:
            log.warning("challenge %s was not opened within %.1f s of its commitment; freeing it",
                        active.params.id, hold_s)
            self.release()

    def _same_validator(self, active: _Active, signer: str | None) -> bool:
        return signer is not None and active.signer is not None and signer.lower() == active.signer.lower()

    def _busy(self, params_id: str | None, signer: str | None) -> web.Response | None:
        """409 while another challenge runs; None when the node is free (again). The validator
        that holds the current challenge asking with a new id replaces a committed one at once
        and orphans one still computing (the thread cannot be stopped: 409 until it ends, then
        it is freed at once instead of being held for an opening)."""
        active = self._active
        if active is None:
            return None
        if params_id is not None and params_id != active.params.id and self._same_validator(active, signer):
            if active.commitment is not None:
                log.warning("challenge %s of %s replaced by its new challenge %s (the validator restarted "
                            "or lost the answer)", active.params.id, signer, params_id)
                self.release()
                return None
            if not active.orphaned:
                log.warning("challenge %s of %s orphaned by its new challenge %s; the node is free as soon "
                            "as its computation ends", active.params.id, signer, params_id)
                active.orphaned = True
            return json_error(409, "challenge_in_progress",
                              {"id": active.params.id, "orphaned": True})
        return json_error(409, "challenge_in_progress", {"id": active.params.id})

    def _memory_problem(self, params: ChallengeParams) -> str | None:
        if self.memory_limit_bytes is not None:
            need = self.prover.required_bytes(params)
            if need > self.memory_limit_bytes:
                return f"needs {need} bytes but this node allows {self.memory_limit_bytes}"
        return self.prover.memory_problem(params)

    # ---------------------------------------------------------------- handlers
    # 401/403/503: the signature and the on-chain validator check of the guard around them
    @api(request=ChallengeRequest, response=CommitmentAnswer, errors=(400, 401, 403, 409, 413, 500, 503, 507),
         summary="Compute C = A·B for the challenge and commit to its rows (validators only).")
    async def handle_challenge(self, request: web.Request) -> web.Response:
        """Compute C_p = A_p·B_p for {id, seed, n, dtype, repeat, parts} and answer with the Merkle root over their rows."""
        signer = request.get("signer")
        if self._active is not None and not self._same_validator(self._active, signer):
            return json_error(409, "challenge_in_progress", {"id": self._active.params.id})
        params: ChallengeParams = await _read(request, ChallengeRequest)
        busy = self._busy(params.id, signer)
        if busy is not None:
            return busy
        # in a thread: the first call may probe the GPU backend (importing torch takes seconds)
        problem = await asyncio.to_thread(self._memory_problem, params)
        if problem is not None:
            return json_error(400, "challenge_too_large", f"n={params.n}, repeat={params.repeat} {problem}")
        busy = self._busy(params.id, signer)  # another request got in while we checked the size
        if busy is not None:
            return busy
        active = _Active(params=params, signer=signer)
        self._active = active
        started = time.perf_counter()
        work = asyncio.get_running_loop().run_in_executor(None, self.prover.commit, params)
        try:
            # shield: if the validator hangs up, the handler is cancelled but the thread
            # cannot be; the node stays busy until it ends, then frees everything.
            commitment = await asyncio.shield(work)
        except asyncio.CancelledError:
            def free(_: object) -> None:
                if self._active is active:
                    self.release()

            work.add_done_callback(free)
            raise
        except MemoryError:
            self.release()
            return json_error(507, "out_of_memory", "the node ran out of memory computing the challenge")
        except Exception:  # a prover failure must not take the miner down
            log.exception("challenge %s failed", params.id)
            self.release()
            return json_error(500, "prover_failed", "the node could not compute the challenge")
        if self._active is active and active.orphaned:  # its validator asked again meanwhile
            self.release()
        if self._active is not active:  # released meanwhile (orphaned, replaced, shutdown)
            return json_error(409, "challenge_cancelled", None)
        active.commitment = commitment
        hold_s = self.hold_s(time.perf_counter() - started)
        active.expiry = asyncio.get_running_loop().call_later(hold_s, self._expire, active, hold_s)
        return _json(CommitmentAnswer(
            id=params.id, root=commitment.root, n=params.n, dtype=params.dtype, repeat=params.repeat,
            parts=params.parts,
            elapsed_s=min(round(time.perf_counter() - started, 6), MAX_ELAPSED_S),
            backend=str(commitment.backend)[:MAX_BACKEND_LENGTH], gpu_uuids=list(self.gpu_uuids),
            driver=self.driver))

    @api(request=OpenRequest, response=OpeningAnswer, errors=(400, 401, 403, 404, 409, 413, 500, 503),
         path={"id": Param(str, "the challenge's id", required=True)},
         summary="Open rows of the committed C with their Merkle paths, then free it (the challenging validator only).")
    async def handle_open(self, request: web.Request) -> web.Response:
        """Open the requested rows {rows: [int]} of the committed C with their Merkle paths, then free it."""
        ident = request.match_info.get("id", "")
        active = self._active
        if active is None or active.params.id != ident:
            return json_error(404, "unknown_challenge", {"id": ident})
        if active.commitment is None:
            return json_error(409, "challenge_not_committed", {"id": ident})
        signer = request.get("signer")
        if active.signer is not None and not self._same_validator(active, signer):
            return json_error(403, "not_your_challenge", "only the validator that sent the challenge may open it")
        # types, the 4096 limit and distinctness are the message's; what depends on n is ours
        rows = list((await _read(request, OpenRequest)).rows)
        n = active.params.rows  # every part's rows
        if len(rows) > min(n, self.max_open_rows):
            return json_error(400, "invalid_rows", f"at most {min(n, self.max_open_rows)} rows may be opened")
        out_of_range = [r for r in rows if r >= n]
        if out_of_range:
            return json_error(400, "invalid_rows", f"row {out_of_range[0]} is outside 0..{n - 1}")
        if self._active is not active:
            return json_error(404, "unknown_challenge", {"id": ident})
        commitment = active.commitment
        self.release()  # one opening per challenge; the rows below are copies

        def answer() -> bytes:  # off the loop: copying and base64 of rows is megabytes
            opened = self.prover.open(commitment, rows)
            return encode(OpeningAnswer(id=ident, rows=[o.to_wire() for o in opened]))

        try:
            body = await asyncio.to_thread(answer)
        except Exception:  # never let a prover bug crash the miner
            log.exception("opening challenge %s failed", ident)
            return json_error(500, "prover_failed", "the node could not open the requested rows")
        self.completed += 1
        return web.Response(body=body, content_type="application/json")


def add_challenge_routes(app: web.Application, service: ChallengeService,
                         require_validator: Callable[[Handler], Handler] | None = None) -> None:
    """Mount POST /challenge and POST /challenge/{id}/open, each wrapped by require_validator."""
    wrap = require_validator or (lambda handler: handler)
    app.router.add_post("/challenge", wrap(service.handle_challenge))
    app.router.add_post("/challenge/{id}/open", wrap(service.handle_open))
