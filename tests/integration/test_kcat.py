"""A real third-party client (kcat) produces a request and reads the response: the README's
example, run as written (with this test's broker and topics)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from pipeline.client import Client

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_kcat_block() -> str:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if "kcat -P" in b)


def test_kcat_request_gets_a_response_kcat_reads(settings, client: Client, start_workers) -> None:
    assert shutil.which("kcat"), "kcat (Debian package kcat) must be installed: make sysdeps"
    start_workers(settings, "fused").wait_ready(client)
    script = _readme_kcat_block()
    # The README's first line asks the local broker; use this test's broker and topics.
    lines = script.splitlines()
    assert lines[0].startswith("BOOTSTRAP=")
    produce, consume = "\n".join(lines[1:3]), lines[3]
    prefix = settings.topic_prefix
    env = {"BOOTSTRAP": settings.bootstrap_servers(), "PATH": "/usr/bin:/bin"}
    produce = produce.replace("sluice.requests", f"{prefix}.requests")
    consume = consume.replace("sluice.responses", f"{prefix}.responses")
    subprocess.run(["bash", "-c", produce], env=env, check=True, timeout=30)
    deadline = time.monotonic() + 30
    out = ""
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["bash", "-c", consume], env=env, capture_output=True, text=True, timeout=30
        )
        out = result.stdout
        if out.strip():
            break
        time.sleep(0.5)
    assert out.startswith("kcat-1 "), out
    assert "correlation-id=demo-42" in out
    assert '"status":"ok"' in out and '"labels"' in out
