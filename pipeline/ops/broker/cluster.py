"""A local KRaft cluster: ``brokers`` nodes on 127.0.0.1, each broker and controller, the
controllers one quorum of that many voters (three tolerate one failure). Topics replicate
min(3, brokers) times with ``min.insync.replicas=2`` from three replicas on.

Each node is a `LocalBroker` in ``<state_dir>/node-<id>``, with its ports fixed in
``cluster.json`` so that a node killed or restarted comes back where the others expect it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.ops.broker import (
    BrokerError,
    LocalBroker,
    _warm_up,
    free_port,
    new_cluster_id,
)


class LocalCluster:
    """``brokers`` KRaft nodes whose files live under ``state_dir``."""

    def __init__(
        self, state_dir: Path, cache_dir: Path, brokers: int = 3, heap_mb: int = 320
    ) -> None:
        self.state_dir = Path(state_dir)
        self.replicas = min(3, brokers)
        self.nodes = {
            i: LocalBroker(
                self.state_dir / f"node-{i}", cache_dir, heap_mb, node_id=i, replicas=self.replicas
            )  # fmt: skip
            for i in range(1, brokers + 1)
        }

    @property
    def layout_file(self) -> Path:
        return self.state_dir / "cluster.json"

    def _layout(self) -> dict[str, Any]:
        """The cluster id and each node's (port, controller port), made once."""
        try:
            return dict(json.loads(self.layout_file.read_text()))
        except (OSError, ValueError):
            pass
        self.state_dir.mkdir(parents=True, exist_ok=True)
        layout = {
            "cluster_id": new_cluster_id(),
            "ports": {str(i): [free_port(), free_port()] for i in self.nodes},
        }
        self.layout_file.write_text(json.dumps(layout))
        return layout

    @property
    def bootstrap(self) -> str:
        ports = self._layout()["ports"]
        return ",".join(f"127.0.0.1:{ports[str(i)][0]}" for i in self.nodes)

    def _launch(self, node_id: int) -> None:
        layout = self._layout()
        ports = layout["ports"]
        voters = ",".join(f"{i}@127.0.0.1:{ports[str(i)][1]}" for i in self.nodes)
        port, controller_port = ports[str(node_id)]
        self.nodes[node_id].launch(port, controller_port, voters, layout["cluster_id"])

    def start(self, timeout_s: float = 180.0) -> str:
        """Start the nodes not running (together: a quorum needs a majority to elect), wait
        until every broker serves; returns the bootstrap list."""
        for node_id, node in self.nodes.items():
            if node.state() is None:
                self._launch(node_id)
        try:
            self.wait_healthy(timeout_s)
            from confluent_kafka.admin import AdminClient

            admin_config: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "log_level": 0}
            admin = AdminClient(admin_config)
            # Metadata first: librdkafka replaces its bootstrap connections with the brokers
            # it learns of, and a request in flight on one fails (_DESTROY_BROKER).
            admin.list_topics(timeout=10)
            _warm_up(admin_config, admin, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.bootstrap

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def kill(self, node_id: int) -> None:
        """SIGKILL one node."""
        self.nodes[node_id].kill()

    def restart(self, node_id: int, graceful: bool = True, timeout_s: float = 120.0) -> None:
        """Stop one node (SIGTERM: a controlled shutdown; or it was killed), start it again
        on the same ports and data, and wait until every partition has all its replicas in
        sync again."""
        if graceful:
            self.nodes[node_id].stop()
        self._launch(node_id)
        self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        """Until every node is a broker in the metadata and every partition's replicas are
        all in sync."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + timeout_s
        last = "no metadata"
        while time.monotonic() < deadline:
            for node_id, node in self.nodes.items():
                if node.state() is None:
                    raise BrokerError(f"node {node_id} exited; log:\n{node.log_tail()}")
            try:
                md = admin.list_topics(timeout=2)
            except Exception as exc:  # noqa: BLE001 - not ready yet, retried until the deadline
                last = str(exc)
                time.sleep(0.3)
                continue
            lagging = [
                f"{t}-{p}"
                for t, topic in md.topics.items()
                for p, part in topic.partitions.items()
                if len(part.isrs) < len(part.replicas) or part.leader < 0
            ]
            if len(md.brokers) == len(self.nodes) and not lagging:
                return
            last = f"brokers {sorted(md.brokers)}, under-replicated {lagging[:5]}"
            time.sleep(0.3)
        raise BrokerError(f"cluster not healthy after {timeout_s}s: {last}")

    def leader_of(self, topic: str, partition: int) -> int:
        """The node that leads ``topic``'s ``partition`` now."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        leader = int(
            admin.list_topics(topic, timeout=10).topics[topic].partitions[partition].leader
        )
        if leader not in self.nodes:
            raise BrokerError(f"{topic}-{partition} has no leader ({leader})")
        return leader

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"-- node {i}\n{n.log_tail(lines)}" for i, n in self.nodes.items())
