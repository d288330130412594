"""Open-loop load from several processes, for rates one Python producer cannot reach.

One process produces about 110k small requests/s on a fast core (benchmarks/README.md), and
above that the generator, not the pipeline, is what a scale-out run measures. `produce`
splits one schedule over ``count`` processes: process ``j`` sends requests ``j``,
``j + count``, ``j + 2·count`` … each at ``start + seq/rate``, so together they keep the
schedule of a single generator. Each writes the time its requests were due (or sent, at the
maximum rate) into one shared array; ``time.perf_counter`` reads CLOCK_MONOTONIC on Linux,
one clock for every process on the host, so the reader in the parent can subtract it from
when the answers came.

The processes are started with ``spawn``: a forked child would inherit the parent's
librdkafka threads half-copied.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from confluent_kafka import Producer

from pipeline.config import Settings
from pipeline.kafka import producer_config
from pipeline.kafka.produce import produce

# Every process more costs a core's worth of CPU beside the broker and the workers; one per
# two workers kept the generators ahead of 8 fused workers on a 16-core host.
WORKERS_PER_GENERATOR = 2
CORES_PER_GENERATOR = 4


def auto_count(workers: int, cores: int | None = None) -> int:
    """How many generator processes a run with ``workers`` workers gets: one per two
    workers, at most one per four cores, at least one."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, min(-(-workers // WORKERS_PER_GENERATOR), cores // CORES_PER_GENERATOR))


def produce_parallel(
    settings: Settings,
    load: Any,
    n: int,
    rate: float | None,
    count: int,
    timeout_s: float,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Send requests ``0 .. n-1`` of ``load`` (a `benchmarks.bench.Load`) from ``count``
    processes; returns each request's due (paced) or send (maximum rate) time."""
    ctx = mp.get_context("spawn")
    sent = ctx.Array("d", n, lock=False)
    counters = [ctx.Value("q", 0, lock=False) for _ in range(count)]
    ready = ctx.Barrier(count + 1)
    start = ctx.Value("d", 0.0, lock=False)
    go = ctx.Event()
    shared = (sent, ready, start, go)
    procs = [
        ctx.Process(
            target=_generate,
            args=(settings, load, n, rate, count, j, counters[j], *shared, timeout_s),
            name=f"sluice-loadgen-{j}",
            daemon=True,
        )
        for j in range(count)
    ]
    for p in procs:
        p.start()
    try:
        # Every producer is connected before the clock starts: a late one would be behind
        # its schedule from the first request.
        ready.wait(timeout=60)
        start.value = time.perf_counter() + 0.05
        go.set()
        deadline = time.monotonic() + timeout_s + 60
        while any(p.is_alive() for p in procs):
            if on_progress is not None:
                on_progress(sum(c.value for c in counters))
            if time.monotonic() > deadline:
                raise RuntimeError("load generators did not finish in time")
            time.sleep(0.25)
        failed = [p.name for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"load generators failed: {failed}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(5)
    return np.frombuffer(sent, dtype=np.float64).copy()


def send(
    producer: Any,
    topic: str,
    load: Any,
    seqs: range,
    start: float,
    rate: float | None,
    sent: np.ndarray,
    tick: Callable[[int], None] | None = None,
) -> None:
    """Produce requests ``seqs`` of ``load``, open loop: request ``seq`` is due at
    ``start + seq/rate`` (at once without a rate), and ``sent[seq]`` gets when it was due
    (or sent): latency counts from there. ``tick(i)`` every 256 requests."""
    headers = load.headers
    for i, seq in enumerate(seqs):
        now = time.perf_counter()
        due = start + seq / rate if rate else now
        if due > now + 0.0005:
            # Sleep only when ahead by more than 0.5 ms: requests then go out in small bursts
            # that keep to the schedule, without a system call per request.
            time.sleep(due - now)
        key, value = load.request(seq, "r")
        produce(producer, topic, value, key, headers)
        sent[seq] = due if rate else time.perf_counter()
        if i % 256 == 0:
            producer.poll(0)
            if tick is not None:
                tick(i)


def _generate(
    settings: Settings,
    load: Any,
    n: int,
    rate: float | None,
    count: int,
    j: int,
    counter: Any,
    sent_shared: Any,
    ready: Any,
    start_shared: Any,
    go: Any,
    timeout_s: float,
) -> None:
    producer = Producer(producer_config(settings, **{"linger.ms": 2}))
    # Connect, and get the idempotent producer's id, outside the measured run: one probe
    # request, answered like the parent's.
    key, value = load.request(0, f"probe-g{j}-")
    produce(producer, settings.requests_topic, value, key, load.headers)
    producer.flush(30)
    sent = np.frombuffer(sent_shared, dtype=np.float64)
    topic = settings.requests_topic
    ready.wait(timeout=60)
    go.wait(timeout=60)
    start = start_shared.value
    gc.collect()
    gc.disable()
    try:
        seqs = range(j, n, count)
        send(producer, topic, load, seqs, start, rate, sent, lambda i: setattr(counter, "value", i))
        counter.value = len(seqs)
        left = producer.flush(timeout_s)
    finally:
        gc.enable()
    if left:
        sys.stderr.write(f"load generator {j}: {left} requests not delivered\n")
        sys.exit(1)
