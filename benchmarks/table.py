"""One bench session: each mode at full speed, then at half of that rate for latency.

Usage: python -m benchmarks.table [--requests N] [--modes relay,naive,fused,split]
                                  [--partitions P]
Prints a markdown table, then one JSON object (all runs) as the last line.
"""

from __future__ import annotations

import argparse
import json

from benchmarks import bench
from pipeline.config import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--modes", default="relay,naive,fused,split")
    parser.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="partitions per topic (default: one per worker process)",
    )
    args = parser.parse_args()
    settings = Settings.from_env()
    rows = []
    for mode in args.modes.split(","):
        n = args.requests if mode != "naive" else max(1000, args.requests // 4)
        common = {"progress": False, "partitions": args.partitions}
        peak = bench.run(settings, mode, n, rate=None, **common)
        half_rate = max(50.0, round(peak["throughput_rps"] / 2, -1))
        half = bench.run(settings, mode, n, rate=half_rate, **common)
        rows.append({"mode": mode, "max": peak, "half": half})
    print("| mode | max req/s | offered (half) | p50 ms | p99 ms | mean batch |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        h = r["half"]
        print(
            f"| {r['mode']} | {r['max']['throughput_rps']:.0f} | {h['offered_rps']:.0f} "
            f"| {h['latency_ms']['p50']} | {h['latency_ms']['p99']} | {h['mean_batch_size']} |"
        )
    print(json.dumps(rows, separators=(",", ":")))


if __name__ == "__main__":
    main()
