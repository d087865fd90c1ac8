"""Node → master: the synced copy of a replica's /data, for the node its new attempt runs on.

When the master places a new attempt of a persistent replica (rescheduled after its node died, or
restarted), the miner that gets it starts it from the master's last synced copy of that replica's
/data (checkpoint resume). Both routes are signed by the node key and answer only the node the
replica is assigned to now (403 for any other signer, a node the replica left included):

- ``GET /tasks/{id}/seed?replica=R`` → {task_id, replica, files: [{path, size, sha256}]}
- ``GET /tasks/{id}/seed/{sha256}?replica=R`` → the bytes of one file of that manifest

The miner verifies every blob's sha256 before it puts the file into /data (miner/seeding.py).
"""

from __future__ import annotations

from aiohttp import web

from prime.auth.middleware import SIGNER
from prime.protocol.answers import DataManifest
from prime.protocol.tasks import is_task_id
from prime.roles.master.cas import BlobStore
from prime.roles.master.service import MasterService
from prime.web import ApiError, Binary, Param, api, json_error
from prime.web.openapi import ascii_int

MAX_REPLICA = 10_000
REPLICA = {"replica": Param(int, "the replica (default 0)", ge=0, le=MAX_REPLICA)}


def add_seed_routes(app: web.Application, service: MasterService, blobs: BlobStore) -> None:
    """Mount the two seed routes (signed by a node; the signature middleware checks the signature)."""
    routes = SeedRoutes(service, blobs)
    app.router.add_get("/tasks/{task_id}/seed", routes.manifest)
    app.router.add_get("/tasks/{task_id}/seed/{sha256}", routes.blob)


class SeedRoutes:
    def __init__(self, service: MasterService, blobs: BlobStore) -> None:
        self.service = service
        self.blobs = blobs

    def _replica(self, request: web.Request) -> tuple[str, int]:
        """(task id, replica) when the signer is the node the replica is assigned to; ApiError otherwise."""
        task_id = request.match_info["task_id"]
        if not is_task_id(task_id):
            raise ApiError(400, "invalid_task_id", {"field": "task_id", "message": "Must be 1-64 letters, digits, '-' or '_'."})
        raw = request.query.get("replica", "")
        replica = 0 if raw == "" else ascii_int(raw, maximum=MAX_REPLICA)
        if replica is None:
            raise ApiError(400, "invalid_request", {"field": "replica", "message": f"Must be a whole number from 0 to {MAX_REPLICA}."})
        task = self.service.task(task_id)
        r = task.replica(replica) if task is not None else None
        signer = str(request[SIGNER])
        if task is None or r is None or r.node is None or r.node.lower() != signer.lower():
            # The same answer whether the task exists or not: a node learns nothing of other tasks.
            raise ApiError(403, "not_assigned", f"Task {task_id} replica {replica} is not assigned to {signer}.")
        return task_id, replica

    @api(response=DataManifest, query=REPLICA, errors=(400, 401, 403, 503))
    async def manifest(self, request: web.Request) -> web.Response:
        """The master's synced copy of one replica's /data: {task_id, replica, files: [{path, size, sha256}]}
        (``final`` is always true: it is a copy). Only for the node the replica is assigned to."""
        task_id, replica = self._replica(request)
        files = self.service.store.manifest(task_id, replica)
        return web.json_response({"task_id": task_id, "replica": replica, "final": True, "files": [
            {"path": f.path, "size": f.size, "sha256": f.sha256} for f in files
        ]})

    @api(response=Binary(), query=REPLICA, errors=(400, 404, 401, 403, 503))
    async def blob(self, request: web.Request) -> web.StreamResponse:
        """The bytes of one file of the replica's synced copy (by sha256; only hashes that copy lists)."""
        task_id, replica = self._replica(request)
        digest = request.match_info["sha256"].lower()
        if not self.service.store.lists_blob(task_id, replica, digest):
            return json_error(404, "unknown_blob", f"Task {task_id} replica {replica} has no synced file with hash {digest}.")
        path = self.blobs.path(digest)
        if not path.is_file():
            return json_error(404, "unknown_blob", f"The content {digest} is missing from the master's store.")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream", "X-Prime-Sha256": digest})
