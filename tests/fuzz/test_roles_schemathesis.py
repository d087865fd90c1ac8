"""Schemathesis fuzzes every role through its own ``/openapi.json``, every request signed.

Each role's real app (tests/web/roles.py: the role's own build function, stub permissions,
no Docker) is served on 127.0.0.1 by an event loop in a thread of its own, so Schemathesis'
synchronous client can call it. Every operation gets ``EXAMPLES`` generated requests
(schema-valid and schema-violating ones, Schemathesis' default modes and phases, so also its
coverage cases and other HTTP methods on each path), each signed by the key that is allowed
to call it (``CALLERS``), so the requests reach the handlers past the 401/403 guards; then a
smaller pass signed by a key with no role (``STRANGER``), which must be refused with a 4xx.
The signing hook (``Sign``, a ``requests`` auth hook on the prepared request) signs the exact
body bytes and request target that go on the wire; a signed request answered 401 fails.
Hooks on each schema mix values that exist (a node's address, a task id, a blob's hash, a
valid body) into the generated ones, so the success paths are fuzzed too.

For every request: no 5xx, no hang (``TIMEOUT_S``), a 4xx answer is the JSON error shape
``{"error", "detail"}``, and Schemathesis' response checks hold (status code, content type,
response schema and headers as documented; ``CHECKS``). After each test every role still
answers ``GET /health``. ``test_discovery_process*`` do the same against a real
``prime discovery start`` process on the session's anvil, and check that it stays alive.

Not in ``CHECKS``: ``positive_data_acceptance`` and ``negative_data_rejection``. The request
schemas are looser than the handlers' validation (path parameters are plain strings, an
announcement's ``ip`` any string, ...), so schema-valid requests are rightly refused with 400;
and the signature header that the schema's security scheme lets Schemathesis corrupt is
replaced by a real signature here, so such "negative" requests are rightly accepted.

Runs are reproducible (``derandomize=True``, no example database) and Hypothesis writes
nothing into the repository (tests/fuzz/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
import pytest_asyncio
import requests
import schemathesis
from eth_account import Account
from eth_account.signers.local import LocalAccount
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import Case, HookContext
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from prime.auth.signing import Domain, sign_headers
from prime.chain.client import RegistryClient
from prime.chain.types import Requirements, Specs
from tests.fixtures.processes import RoleProcess, RoleProcesses, free_port, prime_command
from tests.web.roles import (
    DOMAIN,
    MASTER,
    NODE,
    OWNER,
    RUN,
    STRANGER,
    VALIDATOR,
    Served,
    close_all,
    discovery_app,
    invite_body,
    master_app,
    miner_app,
    serve_app,
    validator_app,
    write_data,
)
from tests.web.test_openapi_roles import sync_one_file

try:  # what urllib3 puts on the wire for a path and query (percent-encoding what is not allowed)
    from urllib3.util.url import _encode_target
except ImportError:  # pragma: no cover - a urllib3 without it sends the target as requests prepared it
    def _encode_target(target: str) -> str:
        return target

T = TypeVar("T")


EXAMPLES = 25  # generated requests per operation, signed by the caller allowed to make them
STRANGER_EXAMPLES = 8  # per operation, signed by a key with no role
PROCESS_EXAMPLES = 12  # per operation of the real discovery process

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), print_blob=False)
STRANGE = settings(FUZZ, max_examples=STRANGER_EXAMPLES)
PROCESS = settings(FUZZ, max_examples=PROCESS_EXAMPLES)

# Schemathesis' checks of one answer against the operation's documentation.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
TIMEOUT_S = 30.0

# Who may call what: (method, path template) → the key, per role; public routes go unsigned.
CALLERS: dict[str, dict[tuple[str, str], LocalAccount]] = {
    "discovery": {
        ("PUT", "/nodes"): NODE,
        ("GET", "/nodes/{address}"): VALIDATOR,
        ("GET", "/runs/{run_id}/nodes"): MASTER,
    },
    "miner": {
        ("POST", "/challenge"): VALIDATOR,
        ("POST", "/challenge/{id}/open"): VALIDATOR,
        ("POST", "/challenge/{id}/verdict"): VALIDATOR,
        ("POST", "/invite"): MASTER,
        ("POST", "/tasks"): MASTER,
        ("GET", "/tasks"): MASTER,
        ("DELETE", "/tasks/{id}"): MASTER,
        ("GET", "/tasks/{id}/logs"): MASTER,
        ("GET", "/tasks/{id}/manifest"): MASTER,
        ("GET", "/tasks/{id}/blobs/{sha256}"): MASTER,
    },
    "master": {
        ("POST", "/heartbeat"): NODE,
        ("POST", "/tasks"): OWNER,
        ("GET", "/tasks"): OWNER,
        ("GET", "/tasks/{task_id}"): OWNER,
        ("DELETE", "/tasks/{task_id}"): OWNER,
        ("GET", "/tasks/{task_id}/logs"): OWNER,
        ("GET", "/tasks/{task_id}/files"): OWNER,
        ("GET", "/tasks/{task_id}/files/{path}"): OWNER,
        # a new attempt's seed: for the node the replica is assigned to (NODE here, or a 403)
        ("GET", "/tasks/{task_id}/seed"): NODE,
        ("GET", "/tasks/{task_id}/seed/{sha256}"): NODE,
        ("GET", "/nodes"): OWNER,
    },
    "validator": {},
}
# A challenge is a real matmul: the fuzzer's sizes are kept small (a big one is the validator's right, not a bug).
MAX_CHALLENGE_N = 64


# --- signing ------------------------------------------------------------------------------------


class Sign(requests.auth.AuthBase):
    """The signing hook: signs the prepared request (the exact body bytes and request target sent)."""

    def __init__(self, account: LocalAccount, audience: str, domain: Domain) -> None:
        self.account, self.audience, self.domain = account, audience, domain

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body
        if body is None:
            body = b""
        elif isinstance(body, str):
            body = request.body = body.encode("utf-8")
        if not isinstance(body, bytes):
            raise TypeError(f"cannot sign a streamed body ({type(body).__name__})")
        target = _encode_target(request.path_url)
        assert request.method is not None
        request.headers.update(sign_headers(self.account, request.method, target, body, audience=self.audience,
                                            domain=self.domain))
        return request


def caller_of(role: str, case: Case) -> LocalAccount | None:
    """The key allowed to call this operation (None: a public route, sent unsigned); the same key signs
    the requests with another method that Schemathesis sends to the operation's path."""
    key = (case.operation.method.upper(), case.operation.path)
    if not case.operation.definition.raw.get("security"):
        return None
    assert key in CALLERS[role], f"{role}: no caller chosen for {key} (add it to CALLERS)"
    return CALLERS[role][key]


# --- what every answer must be ------------------------------------------------------------------


def call(case: Case, target: Target, account: LocalAccount | None, *, signed_ok: bool = True) -> Any:
    """Send ``case`` signed by ``account`` and check the answer; returns it."""
    prepare(case, target)
    kwargs: dict[str, Any] = {"timeout": TIMEOUT_S}
    if account is not None:
        kwargs["auth"] = Sign(account, target.address, target.domain)
    response = case.call(**kwargs)
    status = response.status_code
    where = f"{target.role}: {case.method} {case.formatted_path}"
    assert status < 500, f"{where} answered {status}: {response.text[:500]}"
    if 400 <= status < 500:
        media = (response.headers.get("content-type") or [""])[0].split(";")[0].strip()
        assert media == "application/json", f"{where} answered {status} as {media!r}: {response.text[:300]}"
        error = json.loads(response.content)
        assert isinstance(error, dict) and set(error) == {"error", "detail"} and isinstance(error["error"], str), (where, error)
        if signed_ok and account is not None:  # signed by the right key: never refused for its signature
            assert status != 401, f"{where}, signed by its caller, was refused: {error}"
    case.validate_response(response, checks=CHECKS)
    if status == 200 and case.method == "POST" and case.path == "/challenge":
        release_challenge(target, response.json()["id"])
    return response


def prepare(case: Case, target: Target) -> None:
    """Keep the fuzzer's challenge sizes small (a real matmul runs for each), and do not follow the logs of a
    task that exists: that stream goes on as long as the task runs (the fuzzer's values reach the others)."""
    if case.path.endswith("/logs") and isinstance(case.query, dict) and any(
            value in target.known_paths.get(name, []) for name, value in (case.path_parameters or {}).items()):
        case.query["follow"] = "0"
    if case.path == "/challenge" and isinstance(case.body, dict):
        for name in ("n", "repeat"):
            value = case.body.get(name)
            if type(value) is int and value > MAX_CHALLENGE_N:
                case.body[name] = MAX_CHALLENGE_N


def release_challenge(target: Target, ident: str) -> None:
    """Open a committed challenge, which frees the miner for the next one (else every later one is a 409)."""
    path = f"/challenge/{quote(ident, safe='')}/open"
    body = json.dumps({"rows": [0]}).encode()
    headers = {"Content-Type": "application/json",
               **sign_headers(VALIDATOR, "POST", _encode_target(path), body, audience=target.address, domain=target.domain)}
    answer = requests.post(target.url + path, data=body, headers=headers, timeout=TIMEOUT_S)
    assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])


# --- serving the apps in a thread ---------------------------------------------------------------


class LoopThread:
    """An event loop running in a thread of its own: the served apps live there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-servers", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Target:
    """A served role: where it is, whose key it answers as, in which network, and values that exist in it."""

    role: str
    url: str
    address: str
    domain: Domain
    doc: dict[str, Any] = field(repr=False)
    # Path parameter values that name something that exists (mixed into the generated ones).
    known_paths: dict[str, list[str]] = field(default_factory=dict)
    # Valid request bodies per (method, path template), made fresh for each use (mixed into the generated ones).
    known_bodies: dict[tuple[str, str], list[Callable[[], Any]]] = field(default_factory=dict)

    def health(self) -> int:
        return requests.get(self.url + "/health", timeout=TIMEOUT_S).status_code


def desired_task(task_id: str) -> dict[str, Any]:
    return {"id": task_id, "replica": 0, "attempt": 0, "gpu_indices": [],
            "spec": {"image": "busybox:latest", "command": ["true"], "persistent": True}}


TASK_SPEC = {"image": "busybox:latest", "command": ["sh", "-c", "echo hi"], "gpus": 0}
HEARTBEAT = {"tasks": [], "gpus": [{"index": 0, "util": 10.0, "mem_used_mib": 100, "temp_c": 40.0}], "load": {"cpu": 0.5}}


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, loop_thread: LoopThread) -> Iterator[dict[str, Target]]:
    """Discovery, miner and master apps, served from one thread's loop, with a few records to find (a task, a file)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    closers: list[Any] = []
    servers: list[Served] = []
    made: dict[str, Any] = {}

    async def start() -> dict[str, Target]:
        targets: dict[str, Target] = {}

        async def add(role: str, app: Any, **known: Any) -> Served:
            one = await serve_app(role, app)
            servers.append(one)
            targets[role] = Target(role, one.url, one.address, DOMAIN, one.doc, **known)
            return one

        app, close = discovery_app(tmp / "discovery")
        closers.append(close)
        await add("discovery", app, known_paths={"address": [NODE.address], "run_id": [str(RUN)]}, known_bodies={
            ("PUT", "/nodes"): [lambda: {"ip": "10.0.0.1", "port": 8001, "run_id": RUN}]})

        miner, executor, converger = miner_app(tmp / "miner")
        closers.append(converger.close)
        executor.add("t1", 0)
        blob = write_data(executor.root, "t1", "ckpt/step.txt", b"checkpoint\n")
        miner_served = await add("miner", miner, known_paths={"id": ["t1", "c1"], "sha256": [blob]}, known_bodies={
            ("POST", "/challenge"): [lambda: {"id": "c1", "seed": 42, "n": 16}],
            ("POST", "/challenge/{id}/open"): [lambda: {"rows": [0, 3]}],
            ("POST", "/challenge/{id}/verdict"): [lambda: {"approved": True, "reason": "fast enough", "report_hash": "0x" + "1" * 64}],
            ("POST", "/invite"): [lambda: invite_body(int(time.time()) + 600)],
            ("POST", "/tasks"): [lambda: desired_task("t1"), lambda: desired_task("t2")],
        })

        master, service, master_closers = master_app(tmp / "master", miner_served.url)
        closers.extend(master_closers)
        made["master"] = (service, master)
        await add("master", master, known_bodies={
            ("POST", "/heartbeat"): [lambda: HEARTBEAT],
            ("POST", "/tasks"): [lambda: TASK_SPEC],
        })
        return targets

    async def stop() -> None:
        for one in reversed(servers):
            await one.server.close()
        await close_all(closers)

    try:
        targets = loop_thread.run(start())
        task_id = signed_json(targets["master"], OWNER, "POST", "/tasks", TASK_SPEC)["id"]
        master_service, master_web = made["master"]
        loop_thread.run(sync_one_file(master_service, master_web, task_id))  # its out/result.txt, as a miner's sync leaves it
        targets["master"].known_paths = {"task_id": [task_id], "path": ["out/result.txt"]}
        yield targets
    finally:
        loop_thread.run(stop())


@pytest.fixture
def served_validator(tmp_path: Any, loop_thread: LoopThread, anvil: Any, deployment: Any) -> Iterator[dict[str, Target]]:
    """The validator's app (on the session's anvil), served for one test only: its loops follow the shared chain."""
    async def start() -> tuple[Served, list[Any]]:
        app, closers = await validator_app(tmp_path, anvil, deployment)
        return await serve_app("validator", app), closers

    async def stop(one: Served, closers: list[Any]) -> None:
        await one.server.close()
        await close_all(closers)

    one, closers = loop_thread.run(start())
    try:
        yield {"validator": Target("validator", one.url, one.address, DOMAIN, one.doc)}
    finally:
        loop_thread.run(stop(one, closers))


def signed_json(target: Target, account: LocalAccount, method: str, path: str, body: Any) -> Any:
    """One request outside the fuzzer (setting up a record), signed; its JSON answer."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json",
               **sign_headers(account, method, _encode_target(path), data, audience=target.address, domain=target.domain)}
    answer = requests.request(method, target.url + path, data=data, headers=headers, timeout=TIMEOUT_S)
    assert answer.status_code < 300, (method, path, answer.status_code, answer.text[:300])
    return answer.json()


def schema_of(target: Target) -> Any:
    """The role's own document, with hooks that mix values that exist into the generated ones."""
    schema = schemathesis.openapi.from_dict(target.doc)
    schema.config.update(base_url=target.url)

    @schema.hook("flatmap_path_parameters")
    def existing_names(context: HookContext, path_parameters: dict[str, Any] | None) -> Any:
        if not path_parameters:
            return st.just(path_parameters)
        return st.fixed_dictionaries({
            name: st.sampled_from([value, *target.known_paths.get(name, [])]) for name, value in path_parameters.items()})

    @schema.hook("flatmap_body")
    def valid_bodies(context: HookContext, body: Any) -> Any:
        assert context.operation is not None
        makers = target.known_bodies.get((context.operation.method.upper(), context.operation.path), [])
        if not makers:
            return st.just(body)
        # one in four bodies is a valid one (so the handler's success path is fuzzed too, with the rest generated)
        return st.one_of(st.just(body), st.just(body), st.just(body), st.sampled_from(makers).map(lambda make: make()))

    return schema


@pytest.fixture
def discovery_schema(served: dict[str, Target]) -> Any:
    return schema_of(served["discovery"])


@pytest.fixture
def miner_schema(served: dict[str, Target]) -> Any:
    return schema_of(served["miner"])


@pytest.fixture
def master_schema(served: dict[str, Target]) -> Any:
    return schema_of(served["master"])


@pytest.fixture
def validator_schema(served_validator: dict[str, Target]) -> Any:
    return schema_of(served_validator["validator"])


def assert_healthy(served: dict[str, Target]) -> None:
    down = {role: status for role, target in served.items() if (status := target.health()) != 200}
    assert not down, f"roles not healthy after fuzzing: {down}"


@pytest.fixture
def alive(served: dict[str, Target]) -> Iterator[dict[str, Target]]:
    """After the test, every served role still answers its health check."""
    yield served
    assert_healthy(served)


@pytest.fixture
def validator_alive(served_validator: dict[str, Target]) -> Iterator[dict[str, Target]]:
    yield served_validator
    assert_healthy(served_validator)


discovery = schemathesis.pytest.from_fixture("discovery_schema")
miner = schemathesis.pytest.from_fixture("miner_schema")
master = schemathesis.pytest.from_fixture("master_schema")
validator = schemathesis.pytest.from_fixture("validator_schema")
PUBLIC = ["/health", "/metrics", "/openapi.json"]


# --- the roles, signed by the right key -----------------------------------------------------------


@discovery.parametrize()
@FUZZ
def test_discovery(case: Case, alive: dict[str, Target]) -> None:
    call(case, alive["discovery"], caller_of("discovery", case))


@miner.parametrize()
@FUZZ
def test_miner(case: Case, alive: dict[str, Target]) -> None:
    call(case, alive["miner"], caller_of("miner", case))


@master.parametrize()
@FUZZ
def test_master(case: Case, alive: dict[str, Target]) -> None:
    call(case, alive["master"], caller_of("master", case))


@validator.parametrize()
@FUZZ
def test_validator(case: Case, validator_alive: dict[str, Target]) -> None:
    call(case, validator_alive["validator"], caller_of("validator", case))


# --- the signed routes, signed by a key with no role ----------------------------------------------


@discovery.exclude(path=PUBLIC).parametrize()
@STRANGE
def test_discovery_stranger(case: Case, alive: dict[str, Target]) -> None:
    stranger(case, alive["discovery"])


@miner.exclude(path=PUBLIC).parametrize()
@STRANGE
def test_miner_stranger(case: Case, alive: dict[str, Target]) -> None:
    stranger(case, alive["miner"])


@master.exclude(path=PUBLIC).parametrize()
@STRANGE
def test_master_stranger(case: Case, alive: dict[str, Target]) -> None:
    stranger(case, alive["master"])


def stranger(case: Case, target: Target) -> None:
    response = call(case, target, STRANGER, signed_ok=False)
    assert 400 <= response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:300])


# --- a real `prime discovery start` process ---------------------------------------------------------


DISCOVERY_KEY = Account.create()
SPECS = Specs(gpu_count=1, gpu_model="Test GPU", gpu_memory_mib=16_000, cpu_cores=4, ram_mib=16_000, disk_gib=100)


@dataclass
class Process:
    """The discovery process under fuzzing, and who is who in its run on chain."""

    proc: RoleProcess
    target: Target
    callers: dict[tuple[str, str], LocalAccount]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def discovery_process(anvil: Any, deployment: Any, module_role_processes: RoleProcesses,
                            tmp_path_factory: pytest.TempPathFactory) -> Process:
    """A discovery process on the session's anvil, a run on chain naming it, a node registered for that run."""
    port = free_port()
    command = prime_command("discovery", "start", "--host", "127.0.0.1", "--port", str(port), "--rpc-url", anvil.rpc_url,
                            "--deployment", str(deployment.path), "--data-dir", str(tmp_path_factory.mktemp("discovery")))
    proc = module_role_processes.create("discovery", command, port=port, env={"PRIME_PRIVATE_KEY": DISCOVERY_KEY.key.hex()})
    owner, master, node, provider = (Account.create() for _ in range(4))
    for funded in (owner, provider):
        anvil.set_balance(funded.address, 10 * 10**18)
    async with await RegistryClient.connect(anvil.rpc_url, deployment, account=owner) as client:
        run_id = await client.create_run(Requirements(min_gpus=1), f"{proc.base_url}#{DISCOVERY_KEY.address}", [master.address])
    async with await RegistryClient.connect(anvil.rpc_url, deployment, account=provider) as client:
        await client.register_node(run_id, node, SPECS)
    await proc.start_async()
    answer = await asyncio.to_thread(requests.get, proc.base_url + "/openapi.json", timeout=TIMEOUT_S)
    assert answer.status_code == 200, answer.text[:300]
    target = Target("discovery", proc.base_url, DISCOVERY_KEY.address, Domain.of(deployment), answer.json(),
                    known_paths={"address": [node.address], "run_id": [str(run_id)]},
                    known_bodies={("PUT", "/nodes"): [lambda: {"ip": "127.0.0.1", "port": 9101, "run_id": run_id}]})
    callers = {("PUT", "/nodes"): node, ("GET", "/nodes/{address}"): anvil.accounts[1], ("GET", "/runs/{run_id}/nodes"): master}
    return Process(proc, target, callers)


@pytest.fixture
def process_schema(discovery_process: Process) -> Any:
    return schema_of(discovery_process.target)


@pytest.fixture
def process_alive(discovery_process: Process) -> Iterator[Process]:
    """After the test, the process has not exited and still answers its health check."""
    yield discovery_process
    assert discovery_process.proc.running, f"discovery exited: {discovery_process.proc.logs(50)}"
    assert discovery_process.target.health() == 200


process = schemathesis.pytest.from_fixture("process_schema")


@process.parametrize()
@PROCESS
def test_discovery_process(case: Case, process_alive: Process) -> None:
    """The real process, fuzzed through the /openapi.json it serves, each request signed by its caller."""
    account = process_alive.callers.get((case.operation.method.upper(), case.operation.path))
    if case.operation.definition.raw.get("security"):
        assert account is not None, f"no caller chosen for {case.operation.method} {case.operation.path}"
    call(case, process_alive.target, account)
    assert process_alive.proc.running, f"discovery exited after {case.method} {case.formatted_path}: {process_alive.proc.logs(50)}"


@process.exclude(path=PUBLIC).parametrize()
@STRANGE
def test_discovery_process_stranger(case: Case, process_alive: Process) -> None:
    """The real process's signed routes, signed by a key with no role: a 4xx for each, never a 5xx."""
    response = call(case, process_alive.target, STRANGER, signed_ok=False)
    assert 400 <= response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:300])
    assert process_alive.proc.running, f"discovery exited after {case.method} {case.formatted_path}: {process_alive.proc.logs(50)}"
