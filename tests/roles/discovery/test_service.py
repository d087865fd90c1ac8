"""The discovery service as a real process against a real anvil: who may announce, who may read,
what bad input gets, and that a crash and restart keep every record."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from eth_account import Account
from eth_account.signers.local import LocalAccount

from prime.auth.client import SignedClient
from prime.auth.signing import HEADER_ADDRESS, Domain
from prime.chain.client import RegistryClient
from prime.chain.types import Requirements, Specs
from prime.clients.discovery import DiscoveryClient
from prime.errors import PeerError
from prime.protocol.discovery import NodeAddress
from tests.fixtures.processes import RoleProcess, RoleProcesses, free_port, prime_command
from tests.support.signing import signed

SPECS = Specs(gpu_count=1, gpu_model="Test GPU", gpu_memory_mib=16_000, cpu_cores=4, ram_mib=16_000, disk_gib=100)


@dataclass
class World:
    """Two runs on chain, nodes registered for the first, and one discovery process."""

    discovery: RoleProcess
    run_id: int
    other_run_id: int
    validator: LocalAccount
    master: LocalAccount  # master of run_id
    other_master: LocalAccount  # master of other_run_id only
    node: LocalAccount  # registered for run_id
    node2: LocalAccount  # registered for run_id
    unregistered: LocalAccount  # a key the chain has never seen
    key: LocalAccount  # discovery's own: the audience of requests, the signer of answers
    domain: Domain

    @property
    def url(self) -> str:
        return self.discovery.base_url

    @property
    def uri(self) -> str:
        """What the runs store on chain: the URL and discovery's signer."""
        return f"{self.url}#{self.key.address}"


DISCOVERY_KEY = Account.create()


def discovery_command(port: int, rpc_url: str, deployment_path: Path, data_dir: Path) -> list[str]:
    return prime_command(
        "discovery", "start", "--host", "127.0.0.1", "--port", str(port), "--rpc-url", rpc_url,
        "--deployment", str(deployment_path), "--data-dir", str(data_dir),
    )


def discovery_env(key: LocalAccount = DISCOVERY_KEY) -> dict[str, str]:
    return {"PRIME_PRIVATE_KEY": key.key.hex()}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory) -> World:
    DOMAIN_OF[:] = [Domain.of(deployment)]
    port = free_port()
    discovery = module_role_processes.create(
        "discovery", discovery_command(port, anvil.rpc_url, deployment.path, tmp_path_factory.mktemp("discovery")),
        port=port, env=discovery_env(),
    )
    url = f"{discovery.base_url}#{DISCOVERY_KEY.address}"
    buyer, master, validator = anvil.accounts[2], anvil.accounts[3], anvil.accounts[1]
    other_master = Account.create()

    owner = await RegistryClient.connect(anvil.rpc_url, deployment, account=buyer)
    try:
        run_id = await owner.create_run(Requirements(min_gpus=1), url, [master.address])
        other_run_id = await owner.create_run(Requirements(min_gpus=1), url, [other_master.address])
    finally:
        await owner.close()

    node, node2 = Account.create(), Account.create()
    provider_account = Account.create()
    anvil.set_balance(provider_account.address, 10 * 10**18)
    provider = await RegistryClient.connect(anvil.rpc_url, deployment, account=provider_account)
    try:
        for each in (node, node2):
            await provider.register_node(run_id, each, SPECS)
    finally:
        await provider.close()

    await discovery.start_async()
    return World(discovery, run_id, other_run_id, validator, master, other_master, node, node2, Account.create(),
                 DISCOVERY_KEY, Domain.of(deployment))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def announced(world: World) -> dict[str, NodeAddress]:
    """Both nodes of the run announced once (what most tests read)."""
    records = {}
    for node, port in ((world.node, 9101), (world.node2, 9102)):
        async with SignedClient(node, domain=world.domain) as client:
            records[node.address] = await DiscoveryClient(client, world.uri).announce("127.0.0.1", port, world.run_id)
    return records


async def call_as(account: LocalAccount, url: str, method: str, *args: Any) -> Any:
    """``method`` of a DiscoveryClient signed by ``account``, on the discovery at ``url`` (its signer named)."""
    async with SignedClient(account, domain=DOMAIN_OF[0], retries=0) as client:
        return await getattr(DiscoveryClient(client, f"{url}#{DISCOVERY_KEY.address}"), method)(*args)


DOMAIN_OF: list[Domain] = []  # the session deployment's domain, set by the world fixture


async def raw(
    url: str, method: str, path: str, body: bytes = b"", *, account: LocalAccount | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request with exactly these bytes, signed by ``account`` (unsigned when None); (status, JSON)."""
    sent = dict(headers or {})
    if account is not None:
        sent = {**signed(account, method, path, body, to=DISCOVERY_KEY.address, domain=DOMAIN_OF[0]), **sent}
    if body:
        sent.setdefault("Content-Type", "application/json")
    async with aiohttp.ClientSession() as session, session.request(method, url + path, data=body, headers=sent) as answer:
        text = await answer.text()
        try:
            return answer.status, json.loads(text)
        except ValueError:
            return answer.status, text


# -- who may announce and read ------------------------------------------------------------


async def test_validator_and_run_master_read_an_announced_node(world: World, announced: dict[str, NodeAddress]) -> None:
    mine = announced[world.node.address]
    assert (mine.address, mine.ip, mine.port, mine.run_id) == (world.node.address, "127.0.0.1", 9101, world.run_id)
    assert mine.url == "http://127.0.0.1:9101"

    assert await call_as(world.validator, world.url, "get_node", world.node.address) == mine
    assert await call_as(world.master, world.url, "get_node", world.node.address) == mine
    # lower-case addresses name the same node
    assert await call_as(world.master, world.url, "get_node", world.node.address.lower()) == mine

    run_nodes = await call_as(world.master, world.url, "run_nodes", world.run_id)
    assert mine in run_nodes
    assert {n.address for n in run_nodes} == set(announced)


async def test_reannounce_updates_the_record(world: World, announced: dict[str, NodeAddress]) -> None:
    before = await call_as(world.validator, world.url, "get_node", world.node2.address)
    after = await call_as(world.node2, world.url, "announce", "::1", 9202, world.run_id)
    assert (after.ip, after.port, after.url) == ("::1", 9202, "http://[::1]:9202")
    assert after.updated_at >= before.updated_at
    assert await call_as(world.validator, world.url, "get_node", world.node2.address) == after
    assert after in await call_as(world.master, world.url, "run_nodes", world.run_id)


@pytest.mark.parametrize("who", ["stranger", "other_master", "other_node", "node_itself_for_list"])
async def test_everyone_else_is_forbidden(world: World, announced: dict[str, NodeAddress], who: str) -> None:
    if who == "stranger":
        reader, method, arg = Account.create(), "get_node", world.node.address
    elif who == "other_master":
        reader, method, arg = world.other_master, "get_node", world.node.address
    elif who == "other_node":
        reader, method, arg = world.node2, "get_node", world.node.address
    else:
        reader, method, arg = world.node, "run_nodes", world.run_id
    with pytest.raises(PeerError) as info:
        await call_as(reader, world.url, method, arg)
    assert info.value.status == 403


async def test_run_list_is_for_that_runs_masters_only(world: World, announced: dict[str, NodeAddress]) -> None:
    for reader in (world.other_master, world.validator, Account.create()):
        with pytest.raises(PeerError) as info:
            await call_as(reader, world.url, "run_nodes", world.run_id)
        assert info.value.status == 403
    # the other run's master sees its own (empty) run, not this one's nodes
    assert await call_as(world.other_master, world.url, "run_nodes", world.other_run_id) == []


async def test_stranger_cannot_tell_unknown_from_known_nodes(world: World, announced: dict[str, NodeAddress]) -> None:
    stranger = Account.create()
    status_known, _ = await raw(world.url, "GET", f"/nodes/{world.node.address}", account=stranger)
    status_unknown, _ = await raw(world.url, "GET", f"/nodes/{Account.create().address}", account=stranger)
    assert status_known == status_unknown == 403


async def test_master_of_the_nodes_run_gets_404_before_it_announced(world: World, fresh_account, anvil, deployment) -> None:
    late = Account.create()
    provider = await RegistryClient.connect(anvil.rpc_url, deployment, account=fresh_account())
    try:
        await provider.register_node(world.run_id, late, SPECS)
    finally:
        await provider.close()
    # the run is known from the chain even without a record, so its master may ask and learn "not yet"
    assert await call_as(world.master, world.url, "get_node", late.address) is None
    with pytest.raises(PeerError) as info:
        await call_as(world.other_master, world.url, "get_node", late.address)
    assert info.value.status == 403


async def test_unregistered_node_is_refused_and_nothing_is_stored(world: World) -> None:
    with pytest.raises(PeerError) as info:
        await call_as(world.unregistered, world.url, "announce", "127.0.0.1", 9300, world.run_id)
    assert info.value.status == 403
    assert info.value.body["error"]
    assert await call_as(world.validator, world.url, "get_node", world.unregistered.address) is None
    assert world.unregistered.address not in {n.address for n in await call_as(world.master, world.url, "run_nodes", world.run_id)}


async def test_registered_node_cannot_announce_for_another_run(world: World, announced: dict[str, NodeAddress]) -> None:
    before = await call_as(world.validator, world.url, "get_node", world.node.address)
    with pytest.raises(PeerError) as info:
        await call_as(world.node, world.url, "announce", "127.0.0.1", 9400, world.other_run_id)
    assert info.value.status == 403
    assert await call_as(world.validator, world.url, "get_node", world.node.address) == before
    assert await call_as(world.other_master, world.url, "run_nodes", world.other_run_id) == []


# -- signatures ------------------------------------------------------------------------------


async def test_unsigned_and_forged_requests_get_401(world: World, announced: dict[str, NodeAddress]) -> None:
    body = json.dumps({"ip": "127.0.0.1", "port": 9999, "run_id": world.run_id}).encode()
    path = f"/nodes/{world.node.address}"
    attempts = {
        "unsigned read": await raw(world.url, "GET", path),
        "unsigned announce": await raw(world.url, "PUT", "/nodes", body),
        # a stranger signs but claims to be the run's master
        "claimed address": await raw(
            world.url, "GET", path, account=Account.create(), headers={HEADER_ADDRESS: world.master.address}
        ),
        # the node signed one body, an attacker sends another
        "tampered body": await raw(
            world.url, "PUT", "/nodes", body.replace(b"9999", b"6666"),
            headers=signed(world.node, "PUT", "/nodes", body, to=world.key.address, domain=world.domain),
        ),
        # signed for a different path
        "other path": await raw(
            world.url, "GET", f"/nodes/{world.node2.address}", headers=signed(world.validator, "GET", path, to=world.key.address, domain=world.domain)
        ),
    }
    replayed_headers = signed(world.validator, "GET", path, to=world.key.address, domain=world.domain)
    first = await raw(world.url, "GET", path, headers=replayed_headers)
    attempts["replayed nonce"] = await raw(world.url, "GET", path, headers=replayed_headers)

    assert first[0] == 200
    for name, (status, answer) in attempts.items():
        assert status == 401, (name, status, answer)
        assert isinstance(answer, dict) and answer.get("error"), name
    # none of the forged announces changed the record
    assert await call_as(world.validator, world.url, "get_node", world.node.address) == announced[world.node.address]


# -- bad input -------------------------------------------------------------------------------


def bad_announcements(run_id: int) -> dict[str, bytes]:
    good = {"ip": "127.0.0.1", "port": 9500, "run_id": run_id}

    def body(**change: Any) -> bytes:
        return json.dumps({**good, **change}).encode()

    return {
        "malformed JSON": b'{"ip": "127.0.0.1", "port": ',
        "not an object": json.dumps([good]).encode(),
        "empty body": b"",
        "missing port": json.dumps({"ip": "127.0.0.1", "run_id": run_id}).encode(),
        "ip not a string": body(ip=2130706433),
        "port not a number": body(port="9500"),
        "port is a bool": body(port=True),
        "run id not a number": body(run_id=str(run_id)),
        "bad ip": body(ip="999.0.0.1"),
        "host name": body(ip="localhost"),
        "unspecified ip": body(ip="0.0.0.0"),
        "port 0": body(port=0),
        "port 70000": body(port=70000),
        "negative run id": body(run_id=-1),
        "huge body": json.dumps({**good, "padding": "x" * (100 * 1024)}).encode(),
        "not UTF-8": b'{"ip": "\xff\xfe"}',
    }


async def test_every_bad_announcement_gets_a_4xx_json_error_and_changes_nothing(
    world: World, announced: dict[str, NodeAddress]
) -> None:
    before = await call_as(world.validator, world.url, "get_node", world.node.address)
    answers = {}
    for name, body in bad_announcements(world.run_id).items():
        answers[name] = await raw(world.url, "PUT", "/nodes", body, account=world.node)
    for name, (status, answer) in answers.items():
        assert 400 <= status < 500, (name, status, answer)
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str), (name, answer)
        assert "detail" in answer, (name, answer)
    assert answers["huge body"][0] == 413
    assert answers["port 70000"][0] == answers["bad ip"][0] == answers["negative run id"][0] == 400

    assert await call_as(world.validator, world.url, "get_node", world.node.address) == before
    assert world.discovery.running


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/nodes/0x1234", 400),
        ("/nodes/not-an-address", 400),
        ("/nodes/0x" + "zz" * 20, 400),
        ("/runs/-1/nodes", 400),
        ("/runs/abc/nodes", 400),
        ("/runs/1.5/nodes", 400),
        ("/no/such/route", 404),
    ],
)
async def test_bad_lookups_get_a_4xx_json_error(world: World, path: str, status: int) -> None:
    got, answer = await raw(world.url, "GET", path, account=world.validator)
    assert got == status, answer
    assert isinstance(answer, dict) and answer.get("error")


async def test_wrong_method_gets_a_4xx_json_error(world: World) -> None:
    got, answer = await raw(world.url, "DELETE", "/nodes", account=world.node)
    assert got == 405 and isinstance(answer, dict) and answer.get("error")


# -- operations -------------------------------------------------------------------------------


async def test_health_metrics_and_openapi_are_public(world: World, announced: dict[str, NodeAddress]) -> None:
    assert (await raw(world.url, "GET", "/health"))[0] == 200
    status, spec = await raw(world.url, "GET", "/openapi.json")
    assert status == 200 and {"/nodes", "/nodes/{address}", "/runs/{run_id}/nodes"} <= set(spec["paths"])
    async with aiohttp.ClientSession() as session, session.get(world.url + "/metrics") as answer:
        metrics = await answer.text()
    assert answer.status == 200
    assert _metric(metrics, 'prime_discovery_announces_total{result="stored"}') >= 2


async def test_denials_are_counted(world: World, announced: dict[str, NodeAddress]) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(world.url + "/metrics") as answer:
            before = _metric(await answer.text(), 'prime_discovery_denials_total{endpoint="get_node"}')
        await raw(world.url, "GET", f"/nodes/{world.node.address}", account=Account.create())
        async with session.get(world.url + "/metrics") as answer:
            after = _metric(await answer.text(), 'prime_discovery_denials_total{endpoint="get_node"}')
    assert after == before + 1


def _metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


async def test_crash_and_restart_keep_every_record(world: World, announced: dict[str, NodeAddress]) -> None:
    nodes = (world.node, world.node2)
    before = {n.address: await call_as(world.validator, world.url, "get_node", n.address) for n in nodes}
    listed_before = await call_as(world.master, world.url, "run_nodes", world.run_id)

    world.discovery.kill()  # SIGKILL: no chance to flush anything on the way out
    await world.discovery.start_async()

    after = {n.address: await call_as(world.validator, world.url, "get_node", n.address) for n in nodes}
    assert after == before and all(after.values())
    assert await call_as(world.master, world.url, "run_nodes", world.run_id) == listed_before

    # and a clean stop (SIGTERM) exits 0 and also keeps them
    assert world.discovery.stop() == 0
    await world.discovery.start_async()
    assert await call_as(world.master, world.url, "run_nodes", world.run_id) == listed_before


# -- the command line -------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **discovery_env()}
    return subprocess.run(prime_command(*args), check=False, capture_output=True, text=True, timeout=60, env=env)


def test_start_without_a_readable_deployment_fails_with_one_sentence(tmp_path: Path) -> None:
    for deployment in (tmp_path / "missing.json", tmp_path):
        result = run_cli(
            "discovery", "start", "--port", str(free_port()), "--deployment", str(deployment),
            "--data-dir", str(tmp_path / "data"),
        )
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert "deployment" in result.stderr.lower() and str(deployment) in result.stderr


async def test_start_on_a_busy_port_fails_with_one_sentence(world: World, anvil, deployment, tmp_path: Path) -> None:
    result = run_cli(
        "discovery", "start", "--port", str(world.discovery.port), "--rpc-url", anvil.rpc_url,
        "--deployment", str(deployment.path), "--data-dir", str(tmp_path),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"Port {world.discovery.port} on 127.0.0.1 is already in use" in result.stderr


def test_start_with_an_unreachable_chain_fails_with_one_sentence(deployment, tmp_path: Path) -> None:
    dead_rpc = f"http://127.0.0.1:{free_port()}"
    result = run_cli(
        "discovery", "start", "--port", str(free_port()), "--rpc-url", dead_rpc,
        "--deployment", str(deployment.path), "--data-dir", str(tmp_path),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert dead_rpc in result.stderr


# -- audience, replay across restarts, signed answers (issue 11) -----------------------------


async def test_a_request_captured_before_a_crash_is_refused_after_the_restart(world: World, announced: dict[str, NodeAddress]) -> None:
    first = json.dumps({"ip": "127.0.0.1", "port": 9501, "run_id": world.run_id}).encode()
    captured = signed(world.node, "PUT", "/nodes", first, to=world.key.address, domain=world.domain)
    assert (await raw(world.url, "PUT", "/nodes", first, headers=captured))[0] == 200
    latest = await call_as(world.node, world.url, "announce", "127.0.0.1", 9502, world.run_id)

    world.discovery.kill()  # SIGKILL: whatever the nonce memory is, it must already be on disk
    await world.discovery.start_async()

    status, answer = await raw(world.url, "PUT", "/nodes", first, headers=captured)
    assert status == 401 and "nonce was already used" in answer["detail"]
    # the replay did not roll the record back to port 9501
    assert await call_as(world.validator, world.url, "get_node", world.node.address) == latest


async def test_a_request_signed_for_one_discovery_is_refused_by_another(
    world: World, announced: dict[str, NodeAddress], anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory
) -> None:
    other_key = Account.create()
    port = free_port()
    other = await module_role_processes.start_async(
        "discovery-2", discovery_command(port, anvil.rpc_url, deployment.path, tmp_path_factory.mktemp("discovery-2")),
        port=port, env=discovery_env(other_key),
    )
    body = json.dumps({"ip": "127.0.0.1", "port": 9601, "run_id": world.run_id}).encode()
    for_first = signed(world.node, "PUT", "/nodes", body, to=world.key.address, domain=world.domain)
    status, answer = await raw(other.base_url, "PUT", "/nodes", body, headers=for_first)
    assert status == 401 and "another service" in answer["detail"]
    # signed for the right service but another chain, or another registry: refused too
    for domain in (Domain(world.domain.chain_id + 1, world.domain.registry), Domain(world.domain.chain_id, "0x" + "11" * 20)):
        status, _ = await raw(world.url, "PUT", "/nodes", body, headers=signed(world.node, "PUT", "/nodes", body, to=world.key.address, domain=domain))
        assert status == 401
    # nothing was stored anywhere
    async with SignedClient(world.validator, domain=world.domain, retries=0) as client:
        assert await DiscoveryClient(client, f"{other.base_url}#{other_key.address}").get_node(world.node.address) is None
    assert (await call_as(world.validator, world.url, "get_node", world.node.address)).port != 9601
    other.stop()


async def test_an_answer_discovery_did_not_sign_is_refused(world: World, announced: dict[str, NodeAddress]) -> None:
    # The run names another key than the one the service at that URL signs with: an impostor.
    async with SignedClient(world.validator, domain=world.domain, retries=0) as client:
        with pytest.raises(PeerError) as refused:
            await DiscoveryClient(client, f"{world.url}#{Account.create().address}").get_node(world.node.address)
    assert "not used" in str(refused.value) or refused.value.status == 401

    # Something on the path rewrites where the node is: the signature no longer matches the body.
    async def tamper(request: web.Request) -> web.StreamResponse:
        async with aiohttp.ClientSession() as session:
            async with session.request(request.method, world.url + request.path_qs, headers=request.headers,
                                       data=await request.read()) as upstream:
                body = (await upstream.read()).replace(b"127.0.0.1", b"10.66.66.66")
                headers = {k: v for k, v in upstream.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
                return web.Response(status=upstream.status, body=body, headers=headers)

    proxy = web.Application()
    proxy.router.add_route("*", "/{tail:.*}", tamper)
    runner = web.AppRunner(proxy)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    proxy_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        async with SignedClient(world.validator, domain=world.domain, retries=0) as client:
            with pytest.raises(PeerError) as refused:
                await DiscoveryClient(client, f"{proxy_url}#{world.key.address}").get_node(world.node.address)
            # the request itself was addressed to discovery's key, so the proxy could pass it on;
            # only the changed answer gave it away
            assert "does not match" in str(refused.value)
    finally:
        await runner.cleanup()


async def test_a_discovery_uri_without_a_signer_is_not_asked(world: World) -> None:
    async with SignedClient(world.validator, domain=world.domain, retries=0) as client:
        with pytest.raises(PeerError) as refused:
            await DiscoveryClient(client, world.url).get_node(world.node.address)
    assert "names no signing address" in str(refused.value)
