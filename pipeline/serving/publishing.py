"""Publishing through an async sink (the faust engine): records sent, refused ones
replaced, and each source record acked once everything published for it is delivered."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.kafka import record_error
from pipeline.serving.admission import Admission
from pipeline.serving.records import Job, Origin, Outcome, Publication, Record

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class Publishing(Admission):
    """The stages published through an async sink (the faust engine)."""

    # -- async publishing (faust agents) ----------------------------------------------------

    async def gateway(self, origin: Origin) -> Job | None:
        """Admit a record, or dead-letter it (and answer where possible); None if rejected."""
        admitted = self.admit_or_reject(origin)
        if isinstance(admitted, Job):
            return admitted
        await self.publish([admitted])
        return None

    async def forward(self, job: Job) -> None:
        await self.publish([self.forward_record(job)])

    async def respond(self, outcomes: Sequence[Outcome], stage: str = "infer") -> None:
        await self.publish(self.response_records(outcomes, stage))

    async def publish_results(self, outcomes: Sequence[Outcome]) -> None:
        await self.publish(self.result_records(outcomes))

    async def respond_record(self, origin: Origin) -> None:
        await self.publish([self.respond_result_records(origin)])

    async def publish(self, publications: Sequence[Publication]) -> None:
        """Send every record through the sink; ack each source once its records are in (all
        of them: a source's publications are sent as one, acked once)."""
        by_origin: dict[int, Publication] = {}
        for origin, records in publications:
            if id(origin) in by_origin:
                by_origin[id(origin)][1].extend(records)
            else:
                by_origin[id(origin)] = (origin, list(records))
        for origin, records in by_origin.values():
            deliveries = await self._send(origin, records)
            task = asyncio.ensure_future(self._await_then_ack(deliveries, origin))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    async def _send(
        self, origin: Origin, records: list[Record], replacing: bool = False
    ) -> list[tuple[Record, bool, Awaitable[Any]]]:
        """Hand ``records`` to the sink; one it refuses for itself is replaced at once
        (``replacing`` marks such replacements)."""
        assert self.sink is not None, "async publishing needs a sink"
        deliveries: list[tuple[Record, bool, Awaitable[Any]]] = []
        for r in records:
            try:
                delivery = await self.sink(r.topic, r.key, r.value, r.headers)
                deliveries.append((r, replacing, delivery))
            except Exception as exc:
                code = record_error(exc)
                if code is None:
                    raise
                deliveries += await self._send(
                    origin, self.undeliverable(origin, r, code, str(exc), replacing), True
                )
        return deliveries

    async def _await_then_ack(
        self, deliveries: list[tuple[Record, bool, Awaitable[Any]]], origin: Origin
    ) -> None:
        try:
            while deliveries:
                record, replacing, delivery = deliveries.pop(0)
                try:
                    await delivery
                except Exception as exc:
                    code = record_error(exc)
                    if code is None:
                        raise
                    # Refused by the broker for itself: replaced, and the replacements awaited.
                    deliveries += await self._send(
                        origin, self.undeliverable(origin, record, code, str(exc), replacing), True
                    )
        except Exception:  # noqa: BLE001 - not acked: the record is consumed again
            log.exception(
                "publish failed for %s:%s:%s; left unacked for redelivery",
                origin.topic,
                origin.partition,
                origin.offset,
            )
            return
        if origin.ack is not None:
            result = origin.ack()
            if inspect.isawaitable(result):
                await result

    async def drain(self) -> None:
        """Wait until every pending publish has been delivered and acked."""
        while self._acks:
            await asyncio.gather(*list(self._acks), return_exceptions=True)
