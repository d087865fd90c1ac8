"""The master's Prometheus metrics (served at /metrics on the app's own registry).

Node and replica transitions are counters fed from the state machine's Record* instructions;
the gauges of nodes and replicas by state are computed when /metrics is scraped (a custom
collector), so a heartbeat never pays for counting 10,000 nodes.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from prime.protocol.nodes import NodeState
from prime.protocol.tasks import ReplicaState
from prime.roles.master.state import MasterState


class _StateGauges(Collector):
    """prime_master_nodes{state} and prime_master_replicas{state}, counted at scrape time."""

    def __init__(self, state: Callable[[], MasterState]) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._state()
        nodes = GaugeMetricFamily("prime_master_nodes", "Nodes the master knows, by state.", labels=["state"])
        by_state = Tally(rec.state for rec in state.nodes.values())
        for node_state in NodeState:
            nodes.add_metric([node_state.value], by_state.get(node_state, 0))
        yield nodes
        replicas = GaugeMetricFamily("prime_master_replicas", "Task replicas, by state.", labels=["state"])
        by_replica = Tally(r.state for task in state.tasks.values() for r in task.replicas)
        for replica_state in ReplicaState:
            replicas.add_metric([replica_state.value], by_replica.get(replica_state, 0))
        yield replicas


class MasterMetrics:
    def __init__(self, registry: CollectorRegistry, state: Callable[[], MasterState]) -> None:
        self.node_transitions = Counter(
            "prime_master_node_transitions", "Node state transitions.", ["from", "to"], registry=registry
        )
        self.replica_transitions = Counter(
            "prime_master_replica_transitions", "Task replica state transitions.", ["from", "to"], registry=registry
        )
        # result: accepted | refused | invalid
        self.heartbeats = Counter("prime_master_heartbeats", "Heartbeats received, by outcome.", ["result"], registry=registry)
        # Looked up once: every heartbeat counts itself, and labels() is not free.
        self.heartbeat_accepted = self.heartbeats.labels("accepted")
        # result: sent | failed | skipped
        self.invites = Counter("prime_master_invites", "Invites to approved nodes, by outcome.", ["result"], registry=registry)
        # kind: start | stop; result: ok | failed
        self.pushes = Counter("prime_master_task_pushes", "Task start/stop pushes to miners.", ["kind", "result"], registry=registry)
        self.sync_blobs = Counter(
            "prime_master_sync_blobs_fetched", "Blobs fetched from miners by storage sync.", registry=registry
        )
        self.sync_bytes = Counter(
            "prime_master_sync_bytes_fetched", "Bytes fetched from miners by storage sync.", registry=registry
        )
        # result: ok | failed
        self.syncs = Counter("prime_master_syncs", "Storage syncs of one replica, by outcome.", ["result"], registry=registry)
        # reason: dead; result: ejected | already_out | failed
        self.ejections = Counter("prime_master_ejections", "Nodes ejected on chain by this master, by reason and outcome.",
                                 ["reason", "result"], registry=registry)
        self.chain_events = Counter("prime_master_chain_events", "Registry events applied, by name.", ["event"], registry=registry)
        self.heartbeat_seconds = Histogram(
            "prime_master_heartbeat_handle_seconds", "Time to apply one heartbeat to the state and store it.",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5), registry=registry,
        )
        registry.register(_StateGauges(state))

    def node_transition(self, old: NodeState | None, new: NodeState) -> None:
        self.node_transitions.labels(old.value if old is not None else "none", new.value).inc()

    def replica_transition(self, old: ReplicaState, new: ReplicaState) -> None:
        self.replica_transitions.labels(old.value, new.value).inc()
