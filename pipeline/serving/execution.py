"""Execution: a batch of admitted requests on its model, retried on transient errors and
bisected on a failing batch so that one poison request fails alone."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.models import LoadedModel
from pipeline.models.inputs import Stacking
from pipeline.models.runtime import Pending
from pipeline.protocol import codec
from pipeline.protocol.codec import RequestError
from pipeline.serving.records import Job, Outcome, Running, now_ms
from pipeline.serving.responses import Responses

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class Execution(Responses):
    """Batches of admitted requests on their models."""

    _prepare_pool: ThreadPoolExecutor | None = None

    # -- infer ----------------------------------------------------------------------------

    def infer(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Run a batch of jobs; expired jobs are answered without computing.

        Jobs for different model versions run as separate batches. A batch that raises is
        bisected, so a poison request fails alone.
        """
        outcomes: list[Outcome] = []
        live: dict[LoadedModel, list[Job]] = {}
        t = now_ms()
        for job in jobs:
            job.started_ms = t
            if job.deadline_ms is not None and t >= job.deadline_ms:
                outcomes.extend(self.expired_outcomes([job]))
            else:
                live.setdefault(job.model, []).append(job)
        for model, model_jobs in live.items():
            step = min(model.max_batch_size, model.batch_buckets[-1])
            for i in range(0, len(model_jobs), step):
                outcomes.extend(self._run_bisect(model_jobs[i : i + step]))
        return outcomes

    def expired_outcomes(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Jobs whose deadline passed while queued: answered ``expired``, never computed."""
        t = now_ms()
        outcomes = []
        for job in jobs:
            job.started_ms = t
            error = RequestError(
                codec.EXPIRED, "deadline passed while queued for a batch",
                job.request.id, job.model.name, job.model.version, job.request.reply_to,
            )  # fmt: skip
            outcomes.append(Outcome(job, error=error))
        return outcomes

    def start(self, jobs: list[Job]) -> Running:
        """Stack one model's jobs into pooled buffers and submit them to the device.

        Returns at once on CUDA (the engine decodes the next records meanwhile); `finish`
        collects the outcomes. A failure here is kept for `finish`, which bisects. On CUDA a
        model whose inputs are prepared on the worker (text, images, records) has its
        batches prepared and submitted on one preparation thread, in order, off the
        engine's loop (`prepares_off_loop`).
        """
        t = now_ms()
        for job in jobs:
            job.started_ms = t
        model = jobs[0].model
        if model.inputs.forks:
            return Running(jobs, None, _Submission(jobs), forked=True)
        if prepares_off_loop(model):
            return Running(jobs, None, self._preparation().submit(_submit, jobs))
        return Running(jobs, _submit(jobs))

    def _preparation(self) -> ThreadPoolExecutor:
        pool = self._prepare_pool
        if pool is None:
            pool = ThreadPoolExecutor(1, thread_name_prefix="sluice-prepare")
            self._prepare_pool = pool
        return pool

    def close_preparation(self) -> None:
        pool = self._prepare_pool
        if pool is not None:
            pool.shutdown(wait=True)
            self._prepare_pool = None

    def finish(self, running: Running) -> list[Outcome]:
        """Outcomes of a started batch; one that failed runs again bisected, with retries."""
        running.settle()
        if running.pending is not None:
            try:
                outputs = running.pending.result()
            except Exception:  # noqa: BLE001 - bisected below
                log.debug("batch of %d failed; bisecting", len(running.jobs), exc_info=True)
            else:
                return self._outcomes(
                    running.jobs, outputs, running.pending.elapsed_s, running.pending.extras
                )
        return self._run_bisect(running.jobs)

    def _run_bisect(self, jobs: list[Job]) -> list[Outcome]:
        model = jobs[0].model
        t0 = time.perf_counter()
        attempts = 1
        batch = None
        try:
            batch = model.stack_inputs([j.arrays for j in jobs])
            while True:
                try:
                    outputs = model.run(batch)
                    break
                except Exception as exc:
                    if attempts >= self.settings.max_attempts or not is_transient(exc):
                        raise
                    # Exponential backoff with jitter, so retries from workers sharing a
                    # device do not fall into step.
                    base_s = self.settings.retry_backoff_ms / 1000.0 * 2 ** (attempts - 1)
                    time.sleep(base_s * random.uniform(0.5, 1.5))
                    attempts += 1
        except Exception as exc:  # noqa: BLE001 - any model failure is the request's error
            if len(jobs) > 1:
                mid = len(jobs) // 2
                return self._run_bisect(jobs[:mid]) + self._run_bisect(jobs[mid:])
            job = jobs[0]
            code, message = (
                (exc.code, exc.message) if isinstance(exc, RequestError)
                else (codec.MODEL_ERROR, f"{type(exc).__name__}: {exc}")
            )  # fmt: skip
            error = RequestError(
                code, message, job.request.id, model.name, model.version,
                job.request.reply_to, attempts,
            )  # fmt: skip
            return [Outcome(job, error=error)]
        finally:
            if batch is not None:
                batch.release()
        return self._outcomes(jobs, outputs, time.perf_counter() - t0, batch.extras)

    def _outcomes(
        self,
        jobs: list[Job],
        outputs: list[np.ndarray],
        elapsed_s: float,
        extras: dict[str, np.ndarray] | None = None,
    ) -> list[Outcome]:
        model = jobs[0].model
        # A batch is one version: one variant, but for two variants of one version (A/A).
        variant = jobs[0].variant or ""
        if any((j.variant or "") != variant for j in jobs):
            variant = ""
        batch_size, inference, gateway, infer = self._batch_metrics(model, variant)
        batch_size.observe(len(jobs))
        inference.observe(elapsed_s)
        # Per-stage latency from the produce timestamp: admitted (gateway), computed (infer);
        # the respond stage's is observed with each response.
        produced = np.fromiter((j.origin.timestamp_ms for j in jobs), np.float64, len(jobs))
        admitted = np.fromiter((j.received_ms for j in jobs), np.float64, len(jobs))
        gateway.observe_many(np.maximum(admitted - produced, 0.0) / 1000.0)
        infer.observe_many(np.maximum(now_ms() - produced, 0.0) / 1000.0)
        ms, n = elapsed_s * 1000, len(jobs)
        truncated = extras.get("truncated") if extras else None
        outcomes = [
            Outcome(job, None, None, ms, n, outputs, i,
                    {"truncated": True} if truncated is not None and truncated[i] else None)
            for i, job in enumerate(jobs)
        ]  # fmt: skip
        # Rows that could not be prepared (an image that does not decode): answered alone.
        errors = (extras or {}).get("errors") or ()
        for i, message in enumerate(errors):
            if message is not None:
                job = jobs[i]
                error = RequestError(
                    codec.BAD_IMAGE, message, job.request.id, model.name, model.version,
                    job.request.reply_to,
                )  # fmt: skip
                outcomes[i] = Outcome(job, error=error, inference_ms=ms, batch_size=n)
        return outcomes

    def _batch_metrics(self, model: LoadedModel, variant: str) -> tuple[Any, Any, Any, Any]:
        """A batch's metrics: its size, its time, its requests' latency to admission and to
        their outputs (`labels` costs a lookup under a lock: once per label set)."""
        key = (model.name, model.version, variant)
        children = self._batch_children.get(key)
        if children is None:
            m, name = self.metrics, model.name
            children = self._batch_children[key] = (
                m.batch_size.labels(name),
                m.inference.labels(name),
                m.request_latency.labels(name, model.version, "gateway", variant),
                m.request_latency.labels(name, model.version, "infer", variant),
            )
        return children


def prepares_off_loop(model: LoadedModel) -> bool:
    """Whether a model's batches are prepared on the preparation thread: inputs prepared on
    the worker, on CUDA. On the CPU the model computes on the engine's loop itself, and a
    thread beside it only competes for the same cores and the GIL (MiniLM on 2 cores: 173
    texts/s and p50 289 ms at half load with the thread, 239/s and 48 ms without)."""
    return model.inputs.preparer is not None and model.device.type == "cuda"


def _submit(jobs: list[Job]) -> Pending | None:
    """A batch stacked (prepared) and submitted; None if that failed (bisected later)."""
    model = jobs[0].model
    batch = None
    try:
        batch = model.stack_inputs([j.arrays for j in jobs])
        return model.submit(batch)
    except Exception:  # noqa: BLE001 - finish() runs it again, bisected
        if batch is not None:
            batch.release()
        return None


class _Submission:
    """The ``started`` of a batch whose images decode on torch's own threads: `done` once
    they have; `result` (on the loop, without waiting then) resizes and normalises them
    into the batch and submits it. The decoder never takes the interpreter, so the loop
    admits and answers meanwhile; a preparation thread would wait for it at every call."""

    def __init__(self, jobs: list[Job]) -> None:
        self._model = jobs[0].model
        self._stacking: Stacking | None = None
        try:
            self._stacking = self._model.inputs.begin([j.arrays for j in jobs])
        except Exception:  # noqa: BLE001 - finish() runs it again, bisected
            log.debug("batch of %d failed to start decoding", len(jobs), exc_info=True)

    def done(self) -> bool:
        return self._stacking is None or self._stacking.done()

    def result(self) -> Pending | None:
        if self._stacking is None:
            return None
        batch = None
        try:
            batch = self._stacking.result()
            return self._model.submit(batch)
        except Exception:  # noqa: BLE001 - finish() runs it again, bisected
            if batch is not None:
                batch.release()
            return None


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the device ran out of memory (others are the request's fault)."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return "out of memory" in str(exc).lower()
