"""A compression bomb (64 MiB of spaces under zstd, lz4 and gzip: a few KB on the wire) is
rejected without ending the worker, dead-lettered truncated with its size and sha256, the
requests after it are answered, and a worker killed and restarted reads past it.

The scenario is `benchmarks.chaos.bombs`, also run by ``sluice chaos --scenario garbage``.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.chaos.bombs import BOMB_BYTES, CODECS, bombs
from tests.integration.conftest import make_settings


def test_compression_bombs_are_dead_lettered_truncated_and_read_past(
    bootstrap: str, model_dir: Path, tmp_path: Path
) -> None:
    result = bombs(make_settings(bootstrap, model_dir, partitions=1), tmp_path)
    print(
        f"bombs: RSS idle {result['idle_rss_mb']} MiB, peak {result['max_rss_mb']} MiB; "
        f"DLQ record bytes {result['dlq_record_bytes']}"
    )
    assert set(result["bombs"]) == set(CODECS) and result["bomb_bytes"] == BOMB_BYTES
    assert all(v == 0 for v in result["violations"].values()), result["examples"]
    assert result["dlq_records"] >= len(CODECS)
