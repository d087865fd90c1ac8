"""`prime validator challenge NODE`: one challenge of one node, watched stage by stage, nothing sent on chain.

The same plan and runner as the service's challenges (prime.challenge.runner), sized from
the node's claimed specs on chain; the node's address comes from --url or from the run's
discovery. What the operator sees of it: on a terminal a live display (the time the miner
takes to commit against the time bound as a bar, then the opening and the checks); in a log or
pipe one plain line per stage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from prime.errors import ConfigError, PeerError, PrimeError


class WatchedClient:
    """A ChallengeClient that tells ``on_stage(name, started)`` around each request of the runner:
    ``commit`` for POST /challenge, ``open`` for POST /challenge/{id}/open."""

    def __init__(self, inner: Any, on_stage: Callable[[str, bool], None]) -> None:
        self.inner = inner
        self.on_stage = on_stage

    async def request_bytes(self, method: str, url: str, **kwargs: Any) -> bytes:
        stage = "open" if url.rstrip("/").endswith("/open") else "commit"
        self.on_stage(stage, True)
        try:
            answer: bytes = await self.inner.request_bytes(method, url, **kwargs)
            return answer
        finally:
            self.on_stage(stage, False)


class ChallengeView:
    """What the operator sees of one challenge: live on a terminal, a line per stage otherwise."""

    def __init__(self, console: Console, plan: Any, node: str, url: str) -> None:
        self.console = console
        self.plan = plan
        self.live = console.is_terminal
        self.started = time.monotonic()
        self.progress: Any = None
        self._task: Any = None
        self._ticker: asyncio.Task[None] | None = None
        p = plan.params
        self.say(f"Challenging node {node} at {url}: n={p.n} {p.dtype}, k={plan.k} rows, time bound {plan.bound_s:.2f} s.")

    def say(self, text: str) -> None:
        target = self.progress.console if self.progress is not None else self.console
        target.print(escape(text), highlight=False, soft_wrap=True)

    def __enter__(self) -> ChallengeView:
        if self.live:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                     console=self.console, transient=True)
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    async def _tick(self) -> None:
        while self.progress is not None and self._task is not None:
            self.progress.update(self._task, completed=min(time.monotonic() - self.started, self.plan.bound_s))
            await asyncio.sleep(0.1)

    def stage(self, name: str, started: bool) -> None:
        elapsed = time.monotonic() - self.started
        if name == "commit" and started:
            self.started = time.monotonic()
            if self.progress is not None:
                self._task = self.progress.add_task("the miner computes C = A·B and commits (bar: the time bound)", total=self.plan.bound_s)
                self._ticker = asyncio.get_running_loop().create_task(self._tick())
            else:
                self.say("Challenge sent; waiting for the miner's commitment …")
        elif name == "commit":
            if self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None
            if self.progress is not None and self._task is not None:
                self.progress.remove_task(self._task)
                self._task = None
            self.say(f"Commitment after {elapsed:.2f} s (bound {self.plan.bound_s:.2f} s).")
        elif started:
            if self.progress is not None:
                self._task = self.progress.add_task(f"opening {self.plan.k} rows and checking them", total=None)
            else:
                self.say(f"Opening {self.plan.k} rows and checking them …")
        elif self.progress is not None and self._task is not None:
            self.progress.remove_task(self._task)
            self._task = None


async def challenge_node(*, account: Any, rpc_url: str, deployment: Path, node: str, url: str | None,
                         overrides: dict[str, Any], console: Console) -> tuple[Any, str]:
    """Challenge ``node`` once, as the validator service would: (the report, the URL it was reached at)."""
    from prime.auth.client import SignedClient
    from prime.auth.signing import Domain
    from prime.chain.client import RegistryClient
    from prime.challenge.params import claim_problem, plan_challenge
    from prime.challenge.runner import run_challenge
    from prime.clients.discovery import DiscoveryClient
    from prime.roles.validator.service import MIN_COMMIT_GRACE_S, fixed_overrides, opened_rows_limit

    async with await RegistryClient.connect(rpc_url, deployment) as registry:
        info = await registry.get_node(node)
        if not info.registered:
            raise PrimeError(f"Node {info.node} is not registered with the registry at {registry.address}; check the address and --deployment.")
        claim = claim_problem(info.specs)
        if claim is not None:
            raise PrimeError(f"Node {info.node} claims hardware no challenge can be sized for ({claim}); the validator rejects it without a challenge.")
        domain = Domain(registry.chain_id, registry.address)
        if url is None:
            run = await registry.get_run(info.run_id)
            async with SignedClient(account, domain=domain, timeout_s=10, retries=1) as peers:
                try:
                    address = await DiscoveryClient(peers, run.discovery_uri).get_node(info.node)
                except PeerError as exc:
                    raise PrimeError(f"Discovery at {run.discovery_uri} could not be asked for the node's address ({exc}); pass --url.") from None
            if address is None:
                raise PrimeError(f"Node {info.node} has not announced an address to discovery at {run.discovery_uri}; pass --url if you know it.")
            url = address.url
    plan = plan_challenge(info.specs, overrides)
    commit_limit_s = plan.bound_s + max(MIN_COMMIT_GRACE_S, plan.bound_s)
    with ChallengeView(console, plan, info.node, url) as view:
        async with SignedClient(account, domain=domain, timeout_s=commit_limit_s, retries=0,
                                max_response_bytes=opened_rows_limit(plan)) as client:
            try:
                report = await run_challenge(WatchedClient(client, view.stage), url, node=info.node, specs=info.specs,
                                             params_overrides=fixed_overrides(plan))
            except PeerError as exc:
                raise PrimeError(f"The miner at {url} could not be challenged now ({exc}); check that it runs and retry.") from None
    return report, url


def overrides_from(challenge_n: int | None, challenge_timeout: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if challenge_n is not None:
        out["n"] = challenge_n
    if challenge_timeout is not None:
        if not challenge_timeout > 0:
            raise ConfigError(f"--challenge-timeout must be more than 0 seconds, got {challenge_timeout}.")
        out["bound_s"] = challenge_timeout
    return out
