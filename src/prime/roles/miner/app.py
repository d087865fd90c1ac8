"""The miner's HTTP surface, and who may call what.

- ``GET /health``, ``/metrics``, ``/openapi.json``: public (prime.web).
- ``POST /challenge``, ``POST /challenge/{id}/open``, ``POST /challenge/{id}/verdict``:
  validators on chain (prime.challenge.service; the verdict lets the miner show why it
  was rejected).
- ``POST /invite``: any signed caller; the handler checks the invite against the chain.
- ``/tasks…``: the node's own master, while it is a master of the node's run on chain
  (prime.roles.miner.tasks_api); before any invite, any master of the run.

Every request except the public ones must be signed (401 otherwise).
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from prime.auth.middleware import SIGNER, SignedService, require
from prime.challenge.service import ChallengeService, add_challenge_routes
from prime.protocol.answers import Ok
from prime.protocol.challenge import VerdictNote
from prime.protocol.errors import ValidationError
from prime.protocol.invite import InviteAnswer, InviteBody
from prime.roles.miner.invite import InviteHandler
from prime.roles.miner.state import Verdict
from prime.roles.miner.tasks_api import TasksApi, add_task_routes
from prime.web import api, json_error, make_app

log = logging.getLogger(__name__)

# Task specs (command and env up to 64 KiB each) must fit in one POST /tasks.
CLIENT_MAX_SIZE = 512 * 1024
_CHALLENGE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def build_miner_app(
    *,
    signing: SignedService,
    permissions: Any,  # ChainPermissions: is_validator(addr), is_master(run_id, addr)
    run_id: int,
    challenge: ChallengeService,
    invite: InviteHandler,
    tasks: TasksApi,
    on_verdict: Callable[[Verdict], Awaitable[None] | None],
    current_master: Callable[[], str | None] | None = None,
) -> web.Application:
    """The miner's aiohttp application (background loops are added by the caller).

    ``current_master``: the master the node is with (None: none yet); a master of the run that is
    not it may not push, stop or read tasks (one master per node: docs/protocol.md)."""
    app = make_app(name="miner", middlewares=[signing.middleware()], client_max_size=CLIENT_MAX_SIZE, identity=signing.identity())

    async def validator(request: web.Request, signer: str) -> bool:
        return await permissions.is_validator(signer)

    async def master_of_run(request: web.Request, signer: str) -> bool:
        current = current_master() if current_master is not None else None
        if current is not None and current.lower() != signer.lower():
            return False
        return await permissions.is_master(run_id, signer)

    add_challenge_routes(app, challenge, require(validator))

    @api(request=VerdictNote, response=Ok, errors=(400, 401, 403, 503))
    async def verdict(request: web.Request) -> web.Response:
        """A validator's verdict on this node: {approved, reason, report_hash}.

        Best effort from the validator after it wrote the result on chain; the miner shows
        the reason when it stops for a rejection. Answers {ok: true}.
        """
        challenge_id = request.match_info["id"]
        if not _CHALLENGE_ID.match(challenge_id):
            return json_error(400, "invalid_verdict", "the challenge id must be 1-64 letters, digits, '_' or '-'")
        try:
            body = VerdictNote.from_json(await request.read())
        except ValidationError as exc:
            return json_error(400, "invalid_verdict", exc.detail)
        done = on_verdict(Verdict(body.approved, body.reason, body.report_hash.lower(), request[SIGNER], challenge_id, time.time()))
        if inspect.isawaitable(done):
            await done  # saved before the answer
        return web.json_response({"ok": True})

    app.router.add_post("/challenge/{id}/verdict", require(validator)(verdict))
    app.router.add_post("/invite", api(request=InviteBody, response=InviteAnswer, errors=(400, 409, 401, 403, 503))(invite.handle))
    add_task_routes(app, tasks, master_of_run)
    return app
