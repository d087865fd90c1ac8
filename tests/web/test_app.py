"""make_app: per-app Prometheus metrics by route template; serve: a busy port in one sentence."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from prime.errors import PrimeError
from prime.web import METRICS, bound_port, serve
from tests.web.support import build_app, fetch


async def test_metrics_count_requests_per_route_and_apps_are_independent(serve) -> None:
    first, second = build_app(), build_app()  # two apps in one process must not clash
    server = await serve(first)
    await serve(second)
    for _ in range(3):
        await fetch(server, "GET", "/tasks/abc")
    await fetch(server, "GET", "/boom")
    status, text, resp = await fetch(server, "GET", "/metrics")
    assert status == 200 and resp.content_type == "text/plain"
    assert 'prime_http_requests_total{method="GET",route="/tasks/{task_id}",status="200"} 3.0' in text
    assert 'route="/boom",status="500"' in text
    second_text = generate_latest(second[METRICS]).decode()
    assert "/tasks/{task_id}" not in second_text


async def test_serve_reports_a_busy_port_in_one_sentence() -> None:
    runner = await serve(build_app(), host="127.0.0.1", port=0)
    try:
        port = bound_port(runner)
        with pytest.raises(PrimeError, match=f"Port {port} on 127.0.0.1 is already in use"):
            await serve(build_app(), host="127.0.0.1", port=port)
    finally:
        await runner.cleanup()
