"""A running worker observed the way users observe it: a real Prometheus scraping /metrics,
the built-in /dashboard in headless Chromium, and ``sluice lag`` in a terminal.

Debian's ``prometheus``, ``chromium`` and ``chromium-driver`` are installed by ``make
sysdeps``; these tests are never skipped. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pipeline.client import Client
from pipeline.config import Settings
from pipeline.ops.broker import free_port
from tests.integration.conftest import demo_request
from tests.unit.test_deploy import of_kind, render

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
REQUESTS = 300
CHARTS = ("chart-lag", "chart-throughput", "chart-latency")


def poll_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``check()`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached after {timeout_s}s; last: {last!r}")


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


class Prometheus:
    """Debian's prometheus on 127.0.0.1, scraping one target every second."""

    def __init__(self, target: str, workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "sluice", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        binary = shutil.which("prometheus")
        assert binary, "Debian package `prometheus` is not installed (make sysdeps)"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector ([] while Prometheus is not up yet)."""
        assert self.proc.poll() is None, f"prometheus exited:\n{self.log_tail()}"
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        try:
            body = http_json(url)
        except OSError:
            return []
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.mark.timeout(240)
def test_prometheus_dashboard_and_lag_command(
    settings: Settings, start_workers: Callable[..., Any], client: Client, tmp_path: Path
) -> None:
    # A fused worker serving metrics on a free port, sampling lag every second.
    settings = settings.replace(metrics_port=free_port(), lag_interval_s=1.0)
    group = settings.group_id("fused")
    probes = start_workers(settings, "fused").wait_ready(client)
    futures = [client.submit(demo_request(f"obs-{i}")) for i in range(REQUESTS)]
    client.flush()
    assert {f.result(timeout=60).status for f in futures} == {"ok"}
    expected = REQUESTS + probes

    _check_probes(settings)
    _check_prometheus(settings, group, expected, tmp_path)
    _check_dashboard(settings, client, tmp_path)
    _check_lag_command(settings, group)


def _check_probes(settings: Settings) -> None:
    """The live worker's probes, as the chart's Deployment asks them."""
    for path, key in (("/readyz", "ready"), ("/healthz", "live")):
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}{path}") as r:
            assert r.status == 200 and json.loads(r.read())[key] is True, path


def _check_prometheus(settings: Settings, group: str, expected: int, tmp_path: Path) -> None:
    target = f"127.0.0.1:{settings.metrics_port}"
    prometheus = Prometheus(target, tmp_path)
    try:
        poll_until(lambda: prometheus.value('up{job="sluice"}') == 1, 60, "a successful scrape")
        ok = 'sum(sluice_requests_total{outcome="ok"})'
        poll_until(lambda: prometheus.value(ok) == expected, 30, f"{ok} == {expected}")
        count = 'sum(sluice_request_latency_seconds_count{stage="respond"})'  # end to end
        assert prometheus.value(count) == expected
        assert prometheus.value("sum(sluice_request_latency_seconds_sum)") > 0
        assert prometheus.value('sum(sluice_batch_size_count{model="demo"})') > 0

        # The worker's group on every partition of the topics it consumes (the request topic
        # among them), each with both lags.
        lag = prometheus.query(f'sluice_consumer_lag{{group="{group}"}}')
        partitions = {(s["metric"]["topic"], s["metric"]["partition"]) for s in lag}
        assert {(settings.requests_topic, "0"), (settings.requests_topic, "1")} <= partitions
        time_lag = prometheus.query(f'sluice_consumer_time_lag_seconds{{group="{group}"}}')
        assert len(time_lag) == len(lag)
        # Every request answered: the group catches up, its offsets sum to what was sent.
        caught_up = (
            f'sum(sluice_consumer_lag{{group="{group}"}}) == 0 and '
            f'sum(sluice_consumer_committed_offset{{group="{group}"}}) == {expected}'
        )
        poll_until(lambda: prometheus.query(caught_up), 30, caught_up)
        assert prometheus.value(f'max(sluice_consumer_time_lag_seconds{{group="{group}"}})') == 0
        assert prometheus.value("sluice_inflight_requests") == 0
        # What the Helm chart's ScaledObject scales this worker's Deployment on.
        (scaled,) = of_kind(render({"topics": {"prefix": settings.topic_prefix}}), "ScaledObject")
        query = scaled["spec"]["triggers"][0]["metadata"]["query"]
        assert [s["value"][1] for s in prometheus.query(query)] == ["0"], query
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- prometheus log\n{prometheus.log_tail()}") from None
    finally:
        prometheus.stop()


def _check_dashboard(settings: Settings, client: Client, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # A trickle of requests, so that throughput and latency have something to draw.
    stop = threading.Event()

    def trickle() -> None:
        i = 0
        while not stop.is_set():
            client.submit(demo_request(f"trickle-{i}"))
            client.flush()
            i += 1
            stop.wait(0.02)

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service("/usr/bin/chromedriver", log_output=str(tmp_path / "chromedriver.log"))
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(f"http://127.0.0.1:{settings.metrics_port}/dashboard")

        def drawn() -> dict[str, tuple[int, int]] | None:
            state = {}
            for chart in CHARTS:
                element = driver.find_element("id", chart)
                series = int(element.get_attribute("data-series") or 0)
                points = int(element.get_attribute("data-points") or 0)
                state[chart] = (series, points)
            return state if all(s >= 1 and p >= 2 for s, p in state.values()) else None

        state = poll_until(drawn, 60, "every chart drawing data")
        assert state["chart-lag"][0] >= 2, state  # one line per partition
        # The page's histogram_quantile matches Prometheus' on known buckets.
        quantile = "return window.sluice.quantile(arguments[0], arguments[1], arguments[2])"
        assert driver.execute_script(quantile, 0.5, [1, 2, 4], [0, 10, 10, 10]) == 1.5
        assert driver.execute_script(quantile, 0.99, [1, 2], [0, 0, 10]) == 2
        assert driver.execute_script(quantile, 0.5, [1], [0, 0]) is None
        ARTIFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        logs = driver.get_log("browser")
        severe = [entry for entry in logs if entry["level"] == "SEVERE"]
        assert not severe, f"browser console errors: {severe}"
    finally:
        driver.quit()
        stop.set()
        thread.join(10)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("Debian package `chromium` is not installed (make sysdeps)")


def _check_lag_command(settings: Settings, group: str) -> None:
    env = {**os.environ, **settings.to_env()}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "lag", "--group", group],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG",
                                "TIME-LAG-S"]  # fmt: skip
    rows = [line.split() for line in lines[1:] if line.strip()]
    shown = [(r[0], r[1], r[2]) for r in rows]
    assert (group, settings.requests_topic, "0") in shown
    assert (group, settings.requests_topic, "1") in shown
    for row in rows:
        if row[1] == settings.requests_topic:  # served, so committed
            committed, end, lag = int(row[3]), int(row[4]), int(row[5])
            assert 0 <= lag == end - committed
            assert float(row[6]) >= 0


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_faust_engine_serves_metrics_and_lag(
    settings: Settings, start_workers: Callable[..., Any], client: Client
) -> None:
    settings = settings.replace(engine="faust", metrics_port=free_port(), lag_interval_s=1.0)
    probes = start_workers(settings, "fused").wait_ready(client)
    group = settings.group_id("fused")
    partitions = {(settings.requests_topic, "0"), (settings.requests_topic, "1")}

    def scraped() -> dict[str, Any] | None:
        samples = _samples(_scrape(settings.metrics_port))
        ok = sum(v for n, labels, v in samples
                 if n == "sluice_requests_total" and labels["outcome"] == "ok")  # fmt: skip
        lag = {(labels["topic"], labels["partition"]) for n, labels, _ in samples
               if n == "sluice_consumer_lag" and labels["group"] == group}  # fmt: skip
        return {"ok": ok, "lag": lag} if ok == probes and partitions <= lag else None

    poll_until(scraped, 30, "ok requests and lag on the faust worker's /metrics")


def test_metrics_disabled_serves_nothing_and_still_answers(
    settings: Settings, start_workers: Callable[..., Any], client: Client
) -> None:
    settings = settings.replace(metrics_enabled=False, metrics_port=free_port())
    start_workers(settings, "fused").wait_ready(client)
    futures = [client.submit(demo_request(f"off-{i}")) for i in range(50)]
    client.flush()
    assert {f.result(timeout=60).status for f in futures} == {"ok"}
    with pytest.raises(OSError):
        _scrape(settings.metrics_port)
