"""The worker's HTTP endpoint: /metrics, /api/summary and the self-contained /dashboard."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pipeline.observability.metrics import Metrics
from pipeline.observability.web import MetricsServer, summary


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics(CollectorRegistry())
    for outcome, n in (("ok", 5), ("error", 2)):
        for _ in range(n):
            m.requests.labels("demo", "2", outcome, "").inc()
    m.requests.labels("other", "1", "ok", "").inc(3)
    for seconds in (0.0004, 0.003, 0.003, 0.04):
        m.request_latency.labels("demo", "2", "respond", "").observe(seconds)
    m.request_latency.labels("demo", "2", "gateway", "").observe(9.0)  # not end to end: ignored
    m.batch_size.labels("demo").observe(4)
    m.consumer_lag.labels("g", "t", "1").set(7)
    m.consumer_lag.labels("g", "t", "0").set(3)
    m.consumer_time_lag.labels("g", "t", "0").set(1.5)
    m.consumer_committed_offset.labels("g", "t", "0").set(40)
    m.inflight.set(11)
    m.gpu_utilization.labels("0").set(0.25)
    m.gpu_memory_used.labels("0").set(1e9)
    m.gpu_memory_total.labels("0").set(8e9)
    return m


@pytest.fixture
def server(metrics: Metrics) -> Iterator[MetricsServer]:
    server = MetricsServer(metrics.registry, "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.stop()


def get(url: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def test_summary_shape(metrics: Metrics) -> None:
    s = summary(metrics.registry, now_s=123.0)
    assert s["time_s"] == 123.0
    assert s["requests"] == {"error": 2.0, "ok": 8.0}
    latency = s["latency_s"]
    assert latency["count"] == 4 and latency["sum"] == pytest.approx(0.0464)
    assert latency["le"][:3] == [0.0005, 0.001, 0.002] and latency["le"][-1] == 10.0
    assert len(latency["counts"]) == len(latency["le"]) + 1  # and the +Inf bucket
    assert latency["counts"][:4] == [1, 1, 1, 3] and latency["counts"][-1] == 4
    assert s["batch_size"] == {"count": 1.0, "sum": 4.0}
    assert s["lag"] == [
        {"group": "g", "topic": "t", "partition": 0, "lag": 3, "time_lag_s": 1.5, "committed": 40},
        {"group": "g", "topic": "t", "partition": 1, "lag": 7},
    ]
    assert s["gpus"] == [
        {"gpu": "0", "utilization_ratio": 0.25, "memory_used_bytes": 1e9,
         "memory_total_bytes": 8e9},
    ]  # fmt: skip
    assert s["inflight"] == 11 and s["paused_partitions"] == 0
    json.dumps(s, allow_nan=False)  # what the server sends must be strict JSON


def test_summary_of_an_empty_registry() -> None:
    s = summary(Metrics(CollectorRegistry()).registry)
    assert s["requests"] == {} and s["lag"] == [] and s["gpus"] == []
    assert s["latency_s"] == {"le": [], "counts": [], "count": 0.0, "sum": 0.0}


def test_metrics_endpoint(server: MetricsServer) -> None:
    status, headers, body = get(server.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    ok = [s for s in families["sluice_requests"].samples
          if s.name == "sluice_requests_total" and s.labels["outcome"] == "ok"]  # fmt: skip
    assert sum(s.value for s in ok) == 8
    assert "sluice_consumer_time_lag_seconds" in families
    # Prometheus asks for OpenMetrics first; the same registry answers in that format.
    status, headers, body = get(server.url + "/metrics", "application/openmetrics-text")
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_summary_endpoint(server: MetricsServer, metrics: Metrics) -> None:
    status, headers, body = get(server.url + "/api/summary")
    assert status == 200 and headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert data["requests"] == {"error": 2, "ok": 8}
    metrics.requests.labels("demo", "2", "ok", "").inc()
    assert json.loads(get(server.url + "/api/summary")[2])["requests"]["ok"] == 9


def test_dashboard_is_self_contained(server: MetricsServer) -> None:
    status, headers, body = get(server.url + "/dashboard")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    html = body.decode()
    for chart in ("chart-lag", "chart-throughput", "chart-latency"):
        assert f'<canvas id="{chart}">' in html
    assert 'fetch("api/summary"' in html
    # Nothing from elsewhere: no external URL, no src= at all, and a CSP that forbids it.
    assert not re.search(r"https?://|src=", html)
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "connect-src 'self'" in headers["Content-Security-Policy"]


def test_root_redirects_and_unknown_paths_are_404(server: MetricsServer) -> None:
    request = urllib.request.Request(server.url + "/")
    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(request, timeout=5)
    with info.value as response:
        assert response.code == 302 and response.headers["Location"] == "/dashboard"
    assert get(server.url + "/nope")[0] == 404
    assert get(server.url + "/dashboard/")[0] == 404


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_stop_frees_the_port(metrics: Metrics) -> None:
    server = MetricsServer(metrics.registry).start()
    url = server.url
    assert get(url + "/metrics")[0] == 200
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/metrics", timeout=2)
