"""Getting the node onto the run's registry: check the run first, then register only if needed.

The order matters to operators: everything that can be known without spending money is
checked before the registration transaction (the run exists and has not ended, the node's
hardware meets the run's requirements, the node is not tied to another run), and a node
that is already registered for this run sends no transaction at all. The node key signs
the registration digest; the provider key sends the transaction and the stake.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from prime.chain.types import NodeInfo, NodeStatus, RunInfo, Specs
from prime.errors import PrimeError

log = logging.getLogger(__name__)

_UNITS = {"wei": 1, "gwei": 10**9, "eth": 10**18, "ether": 10**18}


def parse_stake(text: str | None) -> int | None:
    """``--stake``: wei as a whole number, or with a unit ("0.05eth", "2 gwei"); None/"" = the minimum."""
    if text is None or not str(text).strip():
        return None
    raw = str(text).strip().lower().replace(" ", "").replace("_", "")
    unit = 1
    for name, factor in sorted(_UNITS.items(), key=lambda item: -len(item[0])):
        if raw.endswith(name):
            raw, unit = raw[: -len(name)], factor
            break
    try:
        amount = Decimal(raw) * unit
    except InvalidOperation:
        raise PrimeError(f"The stake {text!r} is not an amount; give wei as a whole number or use a unit, e.g. --stake 0.01eth.") from None
    if amount < 0 or amount != amount.to_integral_value():
        raise PrimeError(f"The stake {text!r} is not a whole, non-negative number of wei; e.g. --stake 10000000000000000 or --stake 0.01eth.")
    return int(amount)


def check_run(run: RunInfo, specs: Specs) -> None:
    """Refuse (one sentence, before any transaction) a run this node cannot serve."""
    if run.ended:
        raise PrimeError(f"Run {run.run_id} has ended, so it takes no new nodes; pick an active run with --run-id.")
    unmet = run.requirements.unmet_by(specs)
    if unmet is not None:
        raise PrimeError(f"{unmet.rstrip('.')}, so this node cannot register for run {run.run_id}; choose GPUs with --gpu or another run.")
    problem = validators_refuse(specs)
    if problem is not None:
        raise PrimeError(f"Validators refuse this node's claim before any challenge ({problem.rstrip('.')}), so it "
                         f"would stake for nothing; offer fewer GPUs with --gpu or run it on a host that has what is missing.")


def validators_refuse(specs: Specs) -> str | None:
    """Why the validators' claim check would refuse this node's own probe, where it can tell:
    cores and RAM its challenge needs. A GPU model the built-in table lacks is left to the
    validators (they may extend the table with --gpu-classes)."""
    from prime.challenge.classes import claimed_variant
    from prime.challenge.params import claim_problem

    if specs.gpu_count and claimed_variant(specs) is None:
        return None
    return claim_problem(specs)


@dataclass(frozen=True)
class RegistrationDecision:
    """What to do about the node's on-chain record: register, nothing, or stop with a sentence."""

    register: bool
    refusal: str | None = None
    # Take the old record's stake back first (withdrawStake) — an ejected node, or one whose run
    # ended, comes back without manual steps: the stake returns to the provider, a new one is paid.
    withdraw_first: bool = False


def decide_registration(info: NodeInfo, run_id: int) -> RegistrationDecision:
    """Pure: whether the node must register for ``run_id`` given its current record."""
    status = info.status
    if status == NodeStatus.NONE:
        return RegistrationDecision(register=True)
    if status in (NodeStatus.REGISTERED, NodeStatus.APPROVED, NodeStatus.ACTIVE):
        if info.run_id == run_id:
            return RegistrationDecision(register=False)
        return RegistrationDecision(
            register=False,
            refusal=(
                f"Node {info.node} is already {status.label} in run {info.run_id}, not run {run_id}; "
                f"start it with --run-id {info.run_id} or leave that run first."
            ),
        )
    # Rejected, left, ejected or released: the contract allows a new registration once the stake is withdrawn.
    if info.stake == 0:
        return RegistrationDecision(register=True)
    if status in (NodeStatus.EJECTED, NodeStatus.RELEASED):
        return RegistrationDecision(register=True, withdraw_first=True)
    if status == NodeStatus.REJECTED and info.run_id == run_id:
        return RegistrationDecision(
            register=False,
            refusal=(
                f"Node {info.node} was rejected by a validator for run {run_id} (report 0x{info.report_hash.hex()}); "
                "withdraw its stake and fix the node before registering again."
            ),
        )
    return RegistrationDecision(
        register=False,
        refusal=(
            f"Node {info.node} is {status.label} (run {info.run_id}) and its stake of {info.stake} wei is still "
            "held by the registry; withdraw the stake with the provider key before registering again."
        ),
    )


@dataclass(frozen=True)
class RegistrationResult:
    info: NodeInfo
    tx_hash: str | None  # None: it was registered already


async def ensure_registered(
    node_client: Any,
    provider_client: Any,
    node_account: Any,
    run_id: int,
    specs: Specs,
    *,
    stake_wei: int | None = None,
) -> RegistrationResult:
    """Register the node for ``run_id`` unless it already is; ``PrimeError`` when it cannot be.

    ``node_client`` reads; ``provider_client`` (a RegistryClient with the provider account)
    sends registerNode with the stake, signed over by ``node_account``.
    """
    info = await node_client.get_node(node_account)
    decision = decide_registration(info, run_id)
    if decision.refusal is not None:
        raise PrimeError(decision.refusal)
    if not decision.register:
        return RegistrationResult(info, None)
    if decision.withdraw_first:
        withdrawn = await provider_client.withdraw_stake(node_account)
        log.info(
            "node %s was %s (run %d): withdrew its stake of %d wei to the provider before registering again (tx %s)",
            node_account.address, info.status.label, info.run_id, info.stake, withdrawn.tx_hash,
        )
    if stake_wei is None:
        stake_wei = await node_client.min_stake()
    result = await provider_client.register_node(run_id, node_account, specs, stake_wei=stake_wei)
    log.info("registered node %s for run %d (stake %d wei, tx %s)", node_account.address, run_id, stake_wei, result.tx_hash)
    return RegistrationResult(await node_client.get_node(node_account), result.tx_hash)


def check_discovery_uri(run: RunInfo) -> None:
    """The run's discovery URI must be an http(s) URL before the node announces itself there."""
    parts = urlsplit(run.discovery_uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PrimeError(
            f"Run {run.run_id} names the discovery service {run.discovery_uri!r}, which is not an http(s) URL; ask the run's owner to fix it."
        )
