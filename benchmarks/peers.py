"""sluice against its peers, one session, one load generator.

Usage: python -m benchmarks.peers [--requests N] [--rate R] [--paced-requests M]
                                  [--systems relay,guarded,quix,fused,split] [--progress]

Each system serves the demo model (16 features in, 4 logits out) from the same request topic
to the same response topic, driven by `benchmarks.bench.run`: as fast as the generator can
offer (``--requests``, its maximum), then open loop at ``--rate`` (its latencies: each
request's latency counts from when it was due). Every answer is checked against the model's
direct output. Past a system's maximum its open-loop latency is its backlog: the Quix peer
and fused run once more at half the peer's maximum (``at_quix_half``), where both keep up.

- ``quix``: a Quix Streams application (`benchmarks.quix_peer`), one message at a time as
  its documentation shows, in its own virtualenv in the cache (`quix_python`);
- ``relay``: bare confluent-kafka consume-to-produce, no model: the ceiling that the broker
  and the client allow here;
- ``guarded``: the relay plus what any pipeline that validates requests and never loses one
  must do per request, done as sluice does it (decode and validate, a delivery report per
  record, offsets stored once delivered: ``sluice relay --guarded``), with no model, no
  batching and no answer to encode: the most sluice could reach here if all of its other
  work cost nothing;
- ``fused`` and ``split``: the sluice pipeline (batch engine).

The broker is ``SLUICE_BOOTSTRAP``'s, else the local one (started as ``sluice demo`` starts
it, and stopped afterwards if this run started it). The last stdout line is one JSON object:
each system's figures and the ratios between them, from this one run.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks import bench
from pipeline.config import Settings
from pipeline.models import ModelRegistry, init_demo

QUIX_VERSION = "3.28.1"
# The relay first: it warms a freshly started broker's JIT before the systems compared.
SYSTEMS = ("relay", "guarded", "quix", "fused", "split")
REPO_ROOT = Path(__file__).resolve().parent.parent


def quix_python(cache_dir: Path) -> Path:
    """The Python of a virtualenv with ``quixstreams==QUIX_VERSION``, made on first use.

    The folder is keyed on the version and on this interpreter. Quix Streams pins
    ``confluent-kafka<2.13`` (the project runs a newer one), so it gets its own packages; the
    project's torch and numpy come from this interpreter's site-packages, named in a ``.pth``
    file that puts them *after* the virtualenv's own (``--system-site-packages`` would not
    do: from inside a virtualenv it exposes the base interpreter's packages, not this
    one's). The ``complete`` marker is written last, so an interrupted install is redone.
    """
    parents = site.getsitepackages()
    key = hashlib.sha256(
        "\n".join([QUIX_VERSION, sys.executable, sys.version, *parents]).encode()
    ).hexdigest()[:12]
    folder = cache_dir / "peers" / f"quix-{QUIX_VERSION}-{key}"
    python = folder / "bin" / "python"
    marker = folder / "complete"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f"{folder.name}.lock"):
        if marker.exists():
            return python
        shutil.rmtree(folder, ignore_errors=True)
        sys.stderr.write(f"installing quixstreams=={QUIX_VERSION} into {folder}\n")
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             f"quixstreams=={QUIX_VERSION}"],
            check=True,
        )  # fmt: skip
        # Written after the install: pip must not see (and try to replace) the project's
        # packages while it resolves Quix Streams' own.
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
        (Path(purelib) / "sluice-project-packages.pth").write_text(lines)
        check = subprocess.run(
            [str(python), "-W", "ignore", "-c",
             "import quixstreams, torch, pipeline.models.architectures"],
            env=_peer_env(), capture_output=True, text=True,
        )  # fmt: skip
        if check.returncode:
            raise RuntimeError(f"the Quix Streams virtualenv cannot run the peer:\n{check.stderr}")
        marker.write_text(QUIX_VERSION + "\n")
    return python


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One installer at a time (two test sessions, say), the others wait for its result."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _peer_env() -> dict[str, str]:
    """This environment with the repository first on the path (the peer imports the demo
    model's class from `pipeline`)."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def quix_spawn(
    python: Path, model: str, version: str
) -> Callable[[Settings, Path], list[subprocess.Popen[bytes]]]:
    """`bench.run`'s ``spawn``: the Quix Streams peer on the run's topics, in its log folder
    (its working directory: Quix Streams keeps its state folder there)."""

    def spawn(settings: Settings, log_dir: Path) -> list[subprocess.Popen[bytes]]:
        log_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(python), "-m", "benchmarks.quix_peer",
            "--bootstrap", settings.bootstrap_servers(),
            "--group", settings.group_id("quix"),
            "--requests-topic", settings.requests_topic,
            "--responses-topic", settings.responses_topic,
            "--model-dir", str(settings.models_path.resolve()),
            "--model", model, "--version", version,
        ]  # fmt: skip
        with open(log_dir / "quix.log", "ab") as log:
            return [
                subprocess.Popen(
                    args,
                    env=_peer_env(),
                    cwd=log_dir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
            ]

    return spawn


def run(
    settings: Settings,
    requests: int = 100_000,
    rate: float = 15_000.0,
    paced_requests: int = 60_000,
    systems: tuple[str, ...] = SYSTEMS,
    progress: bool = False,
) -> dict[str, Any]:
    """Each system's maximum (``requests`` at once) and its latencies at ``rate`` req/s
    (``paced_requests``), through one broker and one load generator, and the ratios."""
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"systems must be among {SYSTEMS}, got {sorted(unknown)}")
    init_demo(settings.models_path)
    version = ModelRegistry(settings.models_path).versions("demo")[-1]
    spawn = None
    if "quix" in systems:
        spawn = quix_spawn(quix_python(settings.cache_dir), "demo", version)
    figures: dict[str, Any] = {}

    def drive(system: str, n: int, at: float | None) -> dict[str, Any]:
        # The Quix peer runs as the bench's per-message mode: answers checked, its process.
        quix = system == "quix"
        mode = {"quix": "per-message", "guarded": "guarded-relay"}.get(system, system)
        try:
            brief = _brief(bench.run(settings, mode, n, at, progress=progress,
                                     spawn=spawn if quix else None))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - one system's failure keeps the others'
            brief = {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
        # Each figure as it comes: a run that fails later still leaves these.
        sys.stderr.write(f"{system} {'max' if at is None else at}: {json.dumps(brief)}\n")
        return brief

    for system in systems:
        figures[system] = {"max": drive(system, requests, None)}
        figures[system]["paced"] = drive(system, paced_requests, rate)
    if "quix" in systems and "fused" in systems:
        # Past its maximum a system's open-loop latency is its backlog, not its service
        # time: both again at half the Quix peer's maximum, a load that it keeps up with.
        half = round(figures["quix"]["max"].get("throughput_rps", 0) / 2, -1) or rate
        n = min(paced_requests, int(10 * half))
        for system in ("quix", "fused"):
            figures[system]["at_quix_half"] = drive(system, n, half)
    return {
        "scenario": "peers",
        "cores": os.cpu_count(),
        "model": f"demo v{version} (16 FP32 features, MLP 16-32-4)",
        "payload": "json",
        "quixstreams": QUIX_VERSION,
        "requests": requests,
        "paced_requests": paced_requests,
        "rate": rate,
        "systems": figures,
        "ratios": _ratios(figures),
        "all_correct": all(_correct(r) for f in figures.values() for r in f.values()),
    }


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("sent", "answered", "outcomes", "wrong_outputs", "duplicates", "offered_rps",
            "sent_rps", "throughput_rps", "latency_ms", "mean_batch_size",
            "worker_cpu_us_per_request")  # fmt: skip
    brief = {k: summary.get(k) for k in keys}
    offered = summary.get("offered_rps")
    if offered:
        # Answered at (nearly) the offered rate: its latencies are service, not backlog.
        brief["kept_up"] = summary["throughput_rps"] >= 0.95 * offered
    return brief


def _correct(summary: dict[str, Any]) -> bool:
    return bool(
        "error" not in summary
        and summary["answered"] == summary["sent"]
        and not summary["wrong_outputs"]
        and not summary["duplicates"]
    )


def _ratios(figures: dict[str, Any]) -> dict[str, float | None]:
    """The comparisons the run is for; None where a system was not run."""

    def get(system: str, run: str, *path: str) -> float | None:
        value: Any = figures.get(system, {}).get(run)
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        return float(value) if isinstance(value, int | float) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    fused_max = get("fused", "max", "throughput_rps")
    fused_p50 = get("fused", "paced", "latency_ms", "p50")
    quix_p50 = get("quix", "paced", "latency_ms", "p50")
    quix_half_p50 = get("quix", "at_quix_half", "latency_ms", "p50")
    fused_half_p50 = get("fused", "at_quix_half", "latency_ms", "p50")
    return {
        "fused_over_quix_max": ratio(fused_max, get("quix", "max", "throughput_rps")),
        "fused_over_relay_max": ratio(fused_max, get("relay", "max", "throughput_rps")),
        "guarded_over_relay_max": ratio(
            get("guarded", "max", "throughput_rps"), get("relay", "max", "throughput_rps")
        ),
        "fused_over_guarded_max": ratio(fused_max, get("guarded", "max", "throughput_rps")),
        "split_over_quix_max": ratio(
            get("split", "max", "throughput_rps"), get("quix", "max", "throughput_rps")
        ),
        "fused_p50_ms_paced": fused_p50,
        "quix_p50_ms_paced": quix_p50,
        "quix_p50_over_fused_p50_paced": ratio(quix_p50, fused_p50),
        "fused_p99_ms_paced": get("fused", "paced", "latency_ms", "p99"),
        "rate_quix_half": get("quix", "at_quix_half", "offered_rps"),
        "quix_p50_ms_at_quix_half": quix_half_p50,
        "fused_p50_ms_at_quix_half": fused_half_p50,
        "quix_p99_ms_at_quix_half": get("quix", "at_quix_half", "latency_ms", "p99"),
        "fused_p99_ms_at_quix_half": get("fused", "at_quix_half", "latency_ms", "p99"),
        "quix_p50_over_fused_p50_at_quix_half": ratio(quix_half_p50, fused_half_p50),
    }


@contextlib.contextmanager
def broker(settings: Settings) -> Iterator[Settings]:
    """``settings`` naming a broker: ``SLUICE_BOOTSTRAP``'s, else the local one in the cache
    (as ``sluice demo`` uses it), started here and stopped afterwards if it was not running."""
    if settings.bootstrap:
        yield settings
        return
    from pipeline.ops.broker import LocalBroker

    local = LocalBroker(settings.cache_dir / "broker", settings.cache_dir)
    ours = local.state() is None
    state = local.start()
    try:
        yield settings.replace(bootstrap=state.bootstrap)
    finally:
        if ours:
            local.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="sluice against Quix Streams and the relay.")
    parser.add_argument("--requests", type=int, default=100_000, help="per maximum run")
    parser.add_argument("--rate", type=float, default=15_000.0, help="paced runs' req/s")
    parser.add_argument("--paced-requests", type=int, default=60_000, help="per paced run")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = parser.parse_args()
    with broker(Settings.from_env()) as settings:
        result = run(settings, args.requests, args.rate, args.paced_requests,
                     tuple(args.systems.split(",")), args.progress)  # fmt: skip
    for name, f in result["systems"].items():
        line = f"{name}: max {f['max'].get('throughput_rps', f['max'].get('error'))} req/s"
        for paced in (f[k] for k in ("paced", "at_quix_half") if "latency_ms" in f.get(k, {})):
            lat, behind = paced["latency_ms"], "" if paced["kept_up"] else " (fell behind)"
            line += f"; at {paced['offered_rps']:g} req/s p50 {lat['p50']} p99 {lat['p99']} ms"
            line += behind
        print(line)
    print(json.dumps(result, separators=(",", ":")))
    sys.exit(0 if result["all_correct"] else 1)


if __name__ == "__main__":
    main()
