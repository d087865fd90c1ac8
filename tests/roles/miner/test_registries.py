"""Which registries a miner pulls from: Docker's reading of an image's registry, the policy's
verdicts (default and --allow-registry), and the real executor never contacting a refused
registry (a loopback listener records whether the Docker daemon connected)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from typer.testing import CliRunner

from prime.auth.signing import Domain
from prime.errors import ConfigError
from prime.protocol.heartbeat import DesiredReplica
from prime.protocol.tasks import ReplicaState
from prime.roles.miner import core
from prime.roles.miner.executor import DockerExecutor
from prime.roles.miner.heartbeat import Converger
from prime.roles.miner.registries import (
    Entry,
    InvalidImageReference,
    RegistryPolicy,
    address_refusal,
    parse_entries,
    registry_of,
    system_resolve,
)
from tests.support.signing import peer_client

DIGEST = "sha256:" + "ab" * 32
PUBLIC = "93.184.216.34"  # a global address (example.org's old one); never contacted here


def resolver(table: dict[str, list[str]]):
    """A fake resolver answering from ``table`` (unknown names: no such host), recording calls."""
    calls: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append((host, port))
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


def check(policy: RegistryPolicy, image: str) -> str | None:
    return asyncio.run(policy.check(image))


# ---------------------------------------------------------------- parsing as Docker does


@pytest.mark.parametrize(
    ("image", "registry"),
    [
        ("busybox", "docker.io"),
        ("busybox:1.36", "docker.io"),
        (f"busybox@{DIGEST}", "docker.io"),
        (f"busybox:1.36@{DIGEST}", "docker.io"),
        ("library/busybox", "docker.io"),
        ("team/sub/trainer:v1", "docker.io"),  # no "." / ":" / localhost / uppercase: a Hub namespace
        ("docker.io/library/busybox", "docker.io"),
        ("index.docker.io/team/x", "docker.io"),  # Docker's legacy Hub name
        ("ghcr.io/org/image:v1", "ghcr.io"),
        (f"ghcr.io/org/image@{DIGEST}", "ghcr.io"),
        ("registry.example.org:5000/x/y:tag", "registry.example.org:5000"),
        ("localhost/x", "localhost"),
        ("localhost:5000/team/trainer:v1.2", "localhost:5000"),
        ("myhost:5000/x", "myhost:5000"),  # ":" makes it a registry
        ("127.0.0.1:5000/x:tag", "127.0.0.1:5000"),
        ("[::1]:5000/x", "[::1]:5000"),
        ("[fe80::1]/x", "[fe80::1]"),
        ("127.1/x", "127.1"),
        ("0x7f.0.0.1/x", "0x7f.0.0.1"),
        ("2130706433:80/x", "2130706433:80"),
        ("Foo/bar", "Foo"),  # uppercase: not a namespace, so a registry name
        ("EXAMPLE.com/x", "EXAMPLE.com"),
        ("xn--bcher-kva.example/x", "xn--bcher-kva.example"),  # punycode
        ("127.0.0.1:5000", "docker.io"),  # no "/": docker.io/library/127.0.0.1, tag 5000
        ("2130706433/x", "docker.io"),  # all digits, no "." nor ":": a Hub namespace
    ],
)
def test_registry_of_reads_the_reference_as_docker_does(image: str, registry: str) -> None:
    assert registry_of(image) == registry


@pytest.mark.parametrize(
    "image",
    [
        "",
        "user@host/x",  # no userinfo in references: "@" starts a digest
        "user:pass@evil.example/x",
        "[::ffff:127.0.0.1]/x",  # Docker's grammar has no IPv4-mapped form
        "[::1%eth0]/x",
        "example.com./x",  # trailing dot
        "ex_ample.com/x",  # "_" is not in a registry name
        "-evil.example/x",
        "host:port/x",
        "http://evil.example/x",
        "évil.example/x",
        "foo/Bar",
        "Foo",
        "x:" + "t" * 200,
        "a" * 300 + ".example/x",
        "registry.example/" + "a" * 250,  # name over 255 characters
        "x" * 5000,
        "busybox@sha256:short",
        "busybox ",
        "busybox\n",
    ],
)
def test_invalid_references_are_refused(image: str) -> None:
    with pytest.raises(InvalidImageReference):
        registry_of(image)
    reason = check(RegistryPolicy(resolve=resolver({})), image)
    assert reason is not None and "not a valid Docker image reference" in reason


def test_hostile_long_input_is_rejected_quickly() -> None:
    started = time.perf_counter()
    for image in ("a" * 1000 + "!", "a-" * 500 + "!", "a." * 500 + "/", "a/" * 500, "a" * 1_000_000):
        with pytest.raises(InvalidImageReference):
            registry_of(image)
    assert time.perf_counter() - started < 1.0


# ---------------------------------------------------------------- the default policy


@pytest.mark.parametrize(
    ("image", "why"),
    [
        ("127.0.0.1:5000/x", "an IP literal"),
        ("127.0.0.1/x", "an IP literal"),
        ("10.0.0.5:80/x", "an IP literal"),
        ("8.8.8.8/x", "an IP literal"),  # even a public address: a registry is named by a DNS name
        ("127.1/x", "an IP literal"),
        ("0x7f.0.0.1/x", "an IP literal"),
        ("0177.0.0.1/x", "an IP literal"),
        ("2130706433:80/x", "an IP literal"),
        ("example.0x7f/x", "an IP literal"),
        ("[::1]:5000/x", "an IP literal"),
        ("[::]/x", "an IP literal"),
        ("[2001:db8::1]/x", "an IP literal"),
        ("localhost/x", "a local name"),
        ("localhost:5000/x", "a local name"),
        ("LOCALHOST:5000/x", "a local name"),
        ("registry.localhost/x", "a local name"),
        ("printer.local/x", "a local name"),
        ("metadata.google.internal/x", "a local name"),
        ("host.docker.internal:5000/x", "a local name"),
        ("box.home.arpa/x", "a local name"),
    ],
)
def test_the_default_policy_refuses_ip_literals_and_local_names_without_a_lookup(image: str, why: str) -> None:
    resolve = resolver({})
    reason = check(RegistryPolicy(resolve=resolve), image)
    registry = registry_of(image)
    assert reason == (
        f"image '{image}' names registry {registry}, which this miner does not pull from ({why}); "
        f"the miner's operator can allow it with --allow-registry {registry}"
    )
    assert resolve.calls == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("addresses", "kind"),
    [
        (["127.0.0.1"], "loopback"),
        (["::1"], "loopback"),
        (["::ffff:127.0.0.1"], "loopback"),
        (["10.1.2.3"], "private"),
        (["192.168.1.1"], "private"),
        (["172.16.0.9"], "private"),
        (["fd00::1"], "private"),
        (["169.254.169.254"], "link-local"),  # cloud metadata
        (["fe80::1%eth0"], "link-local"),
        (["0.0.0.0"], "unspecified"),
        (["224.0.0.1"], "multicast"),
        (["240.0.0.1"], "reserved"),
        (["100.64.0.1"], "not a public address"),
        ([PUBLIC, "127.0.0.1"], "loopback"),  # one bad address is enough
    ],
)
def test_names_resolving_to_non_public_addresses_are_refused(addresses: list[str], kind: str) -> None:
    resolve = resolver({"registry.example.org": addresses})
    reason = check(RegistryPolicy(resolve=resolve), "registry.example.org:5000/team/x:v1")
    assert reason is not None and kind in reason and "registry.example.org:5000" in reason
    assert "--allow-registry registry.example.org:5000" in reason
    assert resolve.calls == [("registry.example.org", 5000)]  # type: ignore[attr-defined]


def test_names_resolving_to_public_addresses_are_allowed() -> None:
    resolve = resolver({"ghcr.io": [PUBLIC, "2606:4700::1111"], "registry.example.org": [PUBLIC]})
    policy = RegistryPolicy(resolve=resolve)
    assert check(policy, "ghcr.io/org/image:v1") is None
    assert check(policy, "GHCR.IO/org/image:v1") is None
    assert check(policy, "registry.example.org:5000/x") is None
    assert address_refusal([PUBLIC]) is None


def test_docker_hub_needs_no_lookup() -> None:
    resolve = resolver({})
    policy = RegistryPolicy(resolve=resolve)
    for image in ("busybox", "team/x:v1", "docker.io/library/busybox", "index.docker.io/team/x"):
        assert check(policy, image) is None
    assert resolve.calls == []  # type: ignore[attr-defined]


def test_a_name_that_does_not_resolve_is_refused() -> None:
    reason = check(RegistryPolicy(resolve=resolver({})), "nowhere.example.org/x")
    assert reason is not None and "did not resolve" in reason


def test_a_slow_lookup_is_refused_after_the_timeout() -> None:
    release = threading.Event()

    def slow(host: str, port: int) -> list[str]:
        release.wait(10)
        return ["127.0.0.1"]

    try:
        started = time.monotonic()
        reason = check(RegistryPolicy(resolve=slow, resolve_timeout_s=0.2), "slow.example.org/x")
        assert time.monotonic() - started < 2
        assert reason is not None and "did not resolve within 0.2 s" in reason
    finally:
        release.set()


def test_lookups_in_flight_are_bounded() -> None:
    release = threading.Event()

    def slow(host: str, port: int) -> list[str]:
        release.wait(10)
        return [PUBLIC]

    policy = RegistryPolicy(resolve=slow, resolve_timeout_s=5.0, max_lookups=2)

    async def scenario() -> list[str | None]:
        waiting = [asyncio.create_task(policy.check(f"r{i}.example.org/x")) for i in range(2)]
        await asyncio.sleep(0.1)
        busy = await policy.check("r9.example.org/x")  # a third one at once: refused, no thread
        release.set()
        return [busy, *await asyncio.gather(*waiting)]

    busy, *rest = asyncio.run(scenario())
    assert busy is not None and "too many registry names" in busy
    assert rest == [None, None]


def test_verdicts_are_cached_briefly() -> None:
    resolve = resolver({"registry.example.org": ["10.0.0.1"]})
    policy = RegistryPolicy(resolve=resolve, cache_s=60)

    async def twice() -> tuple[str | None, str | None]:
        return await policy.check("registry.example.org/a"), await policy.check("registry.example.org/b")

    first, second = asyncio.run(twice())
    assert first is not None and second is not None
    assert resolve.calls == [("registry.example.org", 443)]  # type: ignore[attr-defined]


def test_the_system_resolver_sees_loopback_for_localhost() -> None:
    # The real lookup path (getaddrinfo) with a name every host resolves locally.
    assert address_refusal(system_resolve("localhost", 443)) is not None


# ---------------------------------------------------------------- --allow-registry


def test_the_flag_allows_exactly_the_listed_registries() -> None:
    resolve = resolver({})
    policy = RegistryPolicy.from_flags(["127.0.0.1:5000", "ghcr.io,*.corp.example"], resolve=resolve)
    assert check(policy, "127.0.0.1:5000/team/x:v1") is None  # an operator may name a loopback registry
    assert check(policy, "ghcr.io/org/x") is None
    assert check(policy, "GHCR.io/org/x") is None
    assert check(policy, "registry.corp.example/x") is None
    assert check(policy, "a.b.corp.example/x") is None
    for image, registry in [
        ("busybox", "docker.io"),  # Docker Hub too, unless listed
        ("127.0.0.1:5001/x", "127.0.0.1:5001"),
        ("127.0.0.1/x", "127.0.0.1"),
        ("127.1:5000/x", "127.1:5000"),  # the same address written otherwise is another registry
        ("ghcr.io:443/org/x", "ghcr.io:443"),
        ("corp.example/x", "corp.example"),  # a wildcard covers names under it, not itself
        ("evilcorp.example/x", "evilcorp.example"),
        ("registry.corp.example:5000/x", "registry.corp.example:5000"),
    ]:
        assert check(policy, image) == (
            f"image '{image}' names registry {registry}, which this miner does not pull from "
            f"(it is not listed in --allow-registry); the miner's operator can allow it with --allow-registry {registry}"
        )
    assert resolve.calls == []  # type: ignore[attr-defined]  # listed or not: no lookup


def test_listing_docker_hub() -> None:
    policy = RegistryPolicy.from_flags(["docker.io"])
    assert check(policy, "busybox") is None and check(policy, "index.docker.io/team/x") is None
    assert check(RegistryPolicy.from_flags(["index.docker.io"]), "busybox") is None
    assert check(policy, "ghcr.io/x") is not None


def test_entries() -> None:
    assert parse_entries(["  ", "a.example, *.B.example:5000", "[::1]:5000", ""]) == (
        Entry("a.example", None, False), Entry("b.example", 5000, True), Entry("[::1]", 5000, False)
    )
    for bad in ("http://ghcr.io", "ghcr.io/org", "*", "*.", "a b", "host:port", "user@host", "ex_ample.com", "[::1", "*.*.example"):
        with pytest.raises(ConfigError, match="--allow-registry"):
            parse_entries([bad])


def test_policy_description() -> None:
    assert "public registries only" in RegistryPolicy().describe()
    assert RegistryPolicy.from_flags(["ghcr.io", "*.corp.example:5000"]).describe() == "only ghcr.io, *.corp.example:5000"


def test_the_cli_shows_and_checks_the_flag(tmp_path: Path) -> None:
    from prime.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["miner", "start", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "--allow-registry" in shown.output and "PRIME_ALLOW_REGISTRY" in shown.output
    deployment = tmp_path / "deployment.json"
    deployment.write_text("{}")
    for argv, env in (
        (["--allow-registry", "http://127.0.0.1:5000"], {}),
        ([], {"PRIME_ALLOW_REGISTRY": "ghcr.io,bad/path"}),
    ):
        refused = runner.invoke(
            app, ["miner", "start", "--run-id", "1", "--deployment", str(deployment), "--data-dir", str(tmp_path / "d"), *argv], env=env
        )
        assert refused.exit_code != 0  # `prime` prints a ConfigError as one sentence
        assert isinstance(refused.exception, ConfigError) and "--allow-registry" in str(refused.exception)


# ---------------------------------------------------------------- the real executor


@contextlib.contextmanager
def recording_listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP listener on loopback: (port, peers that connected). It closes every connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    seen: list[str] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, peer = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            seen.append(f"{peer[0]}:{peer[1]}")
            connection.close()

    thread = threading.Thread(target=accept, name="recording-listener", daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], seen
    finally:
        stop.set()
        thread.join(5)
        server.close()


def _placement(image: str) -> core.Placement:
    entry = {"id": "t-" + uuid.uuid4().hex[:12], "replica": 0, "attempt": 0, "gpu_indices": [], "spec": {"image": image, "command": ["true"]}}
    return core.place(DesiredReplica.from_json(entry), [])


def _executor(docker_client: docker.DockerClient, node: str, tmp_path: Path, registries: RegistryPolicy | None) -> DockerExecutor:
    return DockerExecutor(
        docker_client, tmp_path / "miner", node, network_mode="none", pull_backoff_s=0.05, stop_timeout_s=0, registries=registries
    )


@pytest.mark.docker
async def test_a_refused_registry_is_never_contacted(docker_client: docker.DockerClient, docker_node_address: str, tmp_path: Path) -> None:
    with recording_listener() as (port, seen):
        image = f"127.0.0.1:{port}/prime-refused:v1"
        refusing = _executor(docker_client, docker_node_address, tmp_path, None)  # the default policy
        status = await refusing.start(_placement(image))
        assert status.state is ReplicaState.FAILED and status.container_id is None
        assert status.reason == (
            f"image '{image}' names registry 127.0.0.1:{port}, which this miner does not pull from (an IP literal); "
            f"the miner's operator can allow it with --allow-registry 127.0.0.1:{port}"
        )
        again = await refusing.start(_placement(image))  # every try: the same one error, still no pull
        assert again.reason == status.reason
        await asyncio.sleep(1.0)
        assert seen == []

        # The control: allowed, the same image makes the daemon connect to the listener.
        allowing = _executor(docker_client, docker_node_address, tmp_path, RegistryPolicy.from_flags([f"127.0.0.1:{port}"]))
        pulled = await allowing.start(_placement(image))
        assert pulled.state is ReplicaState.FAILED and "could not be pulled" in (pulled.reason or "")
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert seen, "the Docker daemon never connected to the listener, so the refusal above proves nothing"


@pytest.mark.docker
async def test_a_refusal_backs_off_like_a_failed_pull(docker_client: docker.DockerClient, docker_node_address: str, tmp_path: Path) -> None:
    resolve = resolver({"registry.example.org": ["10.0.0.1"]})
    policy = RegistryPolicy(resolve=resolve, cache_s=0)
    executor = DockerExecutor(docker_client, tmp_path / "miner", docker_node_address, network_mode="none", pull_backoff_s=60, registries=policy)
    first = await executor.start(_placement("registry.example.org/team/x:v1"))
    second = await executor.start(_placement("registry.example.org/team/x:v1"))
    assert first.state is second.state is ReplicaState.FAILED
    assert first.reason == second.reason and "a private address" in (first.reason or "")
    assert len(resolve.calls) == 1  # type: ignore[attr-defined]  # the second try waits for the backoff


@pytest.mark.docker
async def test_a_refused_image_already_present_still_runs(
    docker_client: docker.DockerClient, busybox_image: str, docker_node_address: str, tmp_path: Path
) -> None:
    image = f"127.0.0.1:1/prime-present:{uuid.uuid4().hex[:12]}"
    docker_client.images.get(busybox_image).tag(image)
    try:
        executor = _executor(docker_client, docker_node_address, tmp_path, None)
        status = await executor.start(_placement(image))
        assert status.state in (ReplicaState.RUNNING, ReplicaState.COMPLETED), status.reason
    finally:
        with contextlib.suppress(docker.errors.APIError):
            await Converger(executor, []).converge([])
            docker_client.images.remove(image)


@pytest.mark.docker
async def test_an_allowed_loopback_registry_is_pulled_from(
    docker_client: docker.DockerClient, busybox_image: str, docker_node_address: str, local_registry: str, tmp_path: Path
) -> None:
    repository, tag = f"{local_registry}/prime-allowed", uuid.uuid4().hex[:12]
    image = f"{repository}:{tag}"
    docker_client.images.get(busybox_image).tag(repository, tag)
    for event in docker_client.images.push(repository, tag=tag, stream=True, decode=True):
        assert "error" not in event, event
    docker_client.images.remove(image)
    executor = _executor(docker_client, docker_node_address, tmp_path, RegistryPolicy.from_flags([local_registry]))
    try:
        refused = await _executor(docker_client, docker_node_address, tmp_path, None).start(_placement(image))
        assert refused.state is ReplicaState.FAILED and "--allow-registry" in (refused.reason or "")
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(image)
        status = await executor.start(_placement(image))
        assert status.state in (ReplicaState.RUNNING, ReplicaState.COMPLETED), status.reason
        docker_client.images.get(image)  # pulled
    finally:
        with contextlib.suppress(docker.errors.APIError):
            await Converger(executor, []).converge([])
            docker_client.images.remove(image, force=True)


# ---------------------------------------------------------------- a real miner


@pytest.mark.docker
async def test_a_miner_reports_a_refused_image_to_its_master_and_never_pulls_it(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, tmp_path: Path
) -> None:
    from tests.fixtures.docker import remove_prime_containers
    from tests.support.miner_env import (
        MASTER_INDEX,
        VALIDATOR_INDEX,
        TestMaster,
        create_run,
        desired_entry,
        running_node,
        sign_invite_body,
    )

    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    master_account = anvil.accounts[MASTER_INDEX]
    reader = await chain_client()
    master = await TestMaster(anvil.accounts[MASTER_INDEX], Domain.of(deployment), interval_s=0.3).start()
    with recording_listener() as (port, seen):
        image = f"127.0.0.1:{port}/prime-refused:v1"
        master.desired = [desired_entry("refused", image, ["true"])]
        try:
            async with running_node(anvil, deployment, run_id, node, tmp_path / "data") as miner:  # no --allow-registry
                await (await chain_client(anvil.accounts[VALIDATOR_INDEX])).report_validation(node.address, True, b"\x0b" * 32)
                async with peer_client(master_account, to=miner.address, domain=Domain.of(deployment), retries=0) as client:
                    body = await sign_invite_body(reader, master_account, run_id, node.address, master.url)
                    await client.request("POST", f"{miner.url}/invite", json=body)
                await master.wait_for(lambda: any(r["state"] == "Failed" for r in master.reports("refused")), timeout_s=60)
                failed = next(r for r in master.reports("refused") if r["state"] == "Failed")
                assert failed["error"] == (
                    f"image '{image}' names registry 127.0.0.1:{port}, which this miner does not pull from (an IP literal); "
                    f"the miner's operator can allow it with --allow-registry 127.0.0.1:{port}"
                )
                heartbeats = len(master.heartbeats)
                await master.wait_for(lambda: len(master.heartbeats) >= heartbeats + 3)  # it keeps trying, never pulling
                assert f"Pulling {image}" not in miner.console.file.getvalue()
            assert seen == []
        finally:
            await master.stop()
            remove_prime_containers(docker_client, node.address)
