"""/openapi.json: every route listed; what @api declares becomes request and response schemas."""

from __future__ import annotations

from tests.web.support import build_app, fetch


async def test_openapi_lists_routes_with_summaries(start) -> None:
    server = await start(build_app())
    status, doc, _ = await fetch(server, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    op = doc["paths"]["/heartbeat"]["post"]
    assert op["summary"] == "Accept a heartbeat."
    assert op["description"] == "The node reports its tasks and GPUs."
    assert "head" not in doc["paths"]["/tasks/{task_id}"]
    params = doc["paths"]["/tasks/{task_id}/files/{path}"]["get"]["parameters"]
    assert [p["name"] for p in params] == ["task_id", "path"]
    assert doc["paths"]["/health"]["get"]["summary"].startswith("Liveness")
