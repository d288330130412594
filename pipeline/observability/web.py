"""The worker's HTTP endpoint: ``/metrics``, a live ``/dashboard`` and its ``/api/summary``,
and the probes ``/readyz`` and ``/healthz`` (`pipeline.observability.health`).

A stdlib `ThreadingHTTPServer` on ``metrics_host:metrics_port`` (127.0.0.1 by default). The
dashboard is one self-contained page (``dashboard.html``: inline JS drawing on <canvas>, no
external resources) for people without Grafana; it polls ``/api/summary`` every second, which
reads the same registry that ``/metrics`` exposes, so both always agree.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from pipeline.observability.health import Health

log = logging.getLogger(__name__)
DASHBOARD_HTML = Path(__file__).with_name("dashboard.html")
# Only what the page itself holds: inline script and style, fetches back to this server.
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:"
)


def summary(registry: CollectorRegistry, now_s: float | None = None) -> dict[str, Any]:
    """The registry's current values, shaped for the dashboard (cumulative, as exported).

    Counters and histograms are totals since the worker started; the page turns them into
    rates and latency quantiles from the differences between two polls.
    """
    requests: dict[str, float] = defaultdict(float)
    buckets: dict[float, float] = defaultdict(float)
    latency = {"count": 0.0, "sum": 0.0}
    batch = {"count": 0.0, "sum": 0.0}
    lag: dict[tuple[str, str, str], dict[str, Any]] = {}
    gpus: dict[str, dict[str, Any]] = {}
    gauges = {"inflight": 0.0, "paused_partitions": 0.0}
    lag_fields = {
        "sluice_consumer_lag": "lag",
        "sluice_consumer_time_lag_seconds": "time_lag_s",
        "sluice_consumer_committed_offset": "committed",
    }
    gpu_fields = {
        "sluice_gpu_utilization_ratio": "utilization_ratio",
        "sluice_gpu_memory_used_bytes": "memory_used_bytes",
        "sluice_gpu_memory_total_bytes": "memory_total_bytes",
    }
    for family in registry.collect():
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "sluice_requests_total":
                requests[labels["outcome"]] += value
            elif name.startswith("sluice_request_latency_seconds") and (
                labels.get("stage") == "respond"  # end to end
            ):
                if name.endswith("_bucket"):
                    buckets[float(labels["le"])] += value
                elif name.endswith("_count"):
                    latency["count"] += value
                elif name.endswith("_sum"):
                    latency["sum"] += value
            elif name in ("sluice_batch_size_count", "sluice_batch_size_sum"):
                batch[name.rsplit("_", 1)[1]] += value
            elif name in lag_fields:
                key = (labels["group"], labels["topic"], labels["partition"])
                row = lag.setdefault(
                    key, {"group": key[0], "topic": key[1], "partition": int(key[2])}
                )
                row[lag_fields[name]] = value
            elif name in gpu_fields:
                gpus.setdefault(labels["gpu"], {"gpu": labels["gpu"]})[gpu_fields[name]] = value
            elif name == "sluice_inflight_requests":
                gauges["inflight"] = value
            elif name == "sluice_paused_partitions":
                gauges["paused_partitions"] = value
    bounds = sorted(buckets)
    return {
        "time_s": time.time() if now_s is None else now_s,
        "requests": dict(sorted(requests.items())),
        # Prometheus' cumulative buckets: counts[i] observations <= le[i]; the last is +Inf,
        # which JSON cannot write, so `le` lists the finite bounds only.
        "latency_s": {
            "le": [b for b in bounds if b != float("inf")],
            "counts": [buckets[b] for b in bounds],
            **latency,
        },
        "batch_size": batch,
        "lag": [lag[k] for k in sorted(lag, key=lambda k: (k[0], k[1], int(k[2])))],
        "gpus": [gpus[k] for k in sorted(gpus, key=int)],
        **gauges,
    }


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept") or "")
            self._send(200, content_type, encoder(self.server.registry))
        elif path == "/api/summary":
            body = json.dumps(summary(self.server.registry), separators=(",", ":")).encode()
            self._send(200, "application/json", body)
        elif path in ("/readyz", "/healthz") and self.server.health is not None:
            health = self.server.health
            ok, state = health.ready() if path == "/readyz" else health.live()
            body = json.dumps(state, separators=(",", ":")).encode()
            self._send(200 if ok else 503, "application/json", body)
        elif path == "/dashboard":  # not "/dashboard/": the page fetches a relative URL
            self._send(200, "text/html; charset=utf-8", self.server.dashboard, _CSP)
        elif path == "/":
            self.send_response(302)
            self.send_header("Location", "/dashboard")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /dashboard\n")

    def _send(self, status: int, content_type: str, body: bytes, csp: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if csp:
            self.send_header("Content-Security-Policy", csp)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: CollectorRegistry
    health: Health | None
    dashboard: bytes


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves one registry (and the probes, given a `Health`) on ``host:port`` (port 0: any
    free port) from a daemon thread."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int = 0,
        health: Health | None = None,
    ):
        self.registry = registry
        self.health = health
        self.host = host
        self.requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        server_class = _Server6 if ":" in self.host else _Server
        server = server_class((self.host, self.requested_port), _Handler)
        server.registry = self.registry
        server.health = self.health
        server.dashboard = DASHBOARD_HTML.read_bytes()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="sluice-http",
            daemon=True,
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
