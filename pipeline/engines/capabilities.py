"""What each engine can do, declared in one place; `Settings` refuses at start a setting an
engine would otherwise ignore, naming both sides.

| capability                                  | batch | faust |
|---------------------------------------------|:-----:|:-----:|
| the priority topic served first             |  yes  |  no   |
| backpressure between split stages           |  yes  |  no   |
| exactly-once delivery                       |  yes  |  no   |
| features fetched off the loop               |  yes  |  no   |
| device overlap (batches in flight)          |  yes  |  no   |

faust reads the priority topic beside the requests topic (its requests are served, not
first), and runs the split stages without pausing on lag; README.md says why these stay
with the batch engine.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from pipeline.config import Delivery, Engine, SettingsError

if TYPE_CHECKING:
    from pipeline.config import Settings


class Capability(StrEnum):
    PRIORITY = "the priority topic served first"
    BACKPRESSURE = "backpressure between split stages"
    EXACTLY_ONCE = "exactly-once delivery"
    FEATURES_OFF_LOOP = "features fetched off the loop"
    DEVICE_OVERLAP = "device overlap (batches in flight)"


SUPPORTS: dict[Engine, frozenset[Capability]] = {
    Engine.BATCH: frozenset(Capability),
    Engine.FAUST: frozenset(),
}


def asked(settings: Settings) -> dict[Capability, str]:
    """The capabilities ``settings`` ask for, each with the setting that asks."""
    wanted: dict[Capability, str] = {}
    if settings.delivery == Delivery.EXACTLY_ONCE:
        wanted[Capability.EXACTLY_ONCE] = f"SLUICE_DELIVERY={settings.delivery}"
    return wanted


def check(settings: Settings) -> None:
    """Raise `SettingsError` for a capability the settings ask of an engine without it."""
    engine = Engine(settings.engine)
    for capability, setting in asked(settings).items():
        if capability not in SUPPORTS[engine]:
            able = [e.value for e, caps in SUPPORTS.items() if capability in caps]
            raise SettingsError(
                f"SLUICE_ENGINE={engine} does not support {capability} ({setting}); "
                f"use SLUICE_ENGINE={' or '.join(able)}"
            )
