"""The public API is small and pinned: what users import from `pipeline`, and nothing
heavy on import."""

from __future__ import annotations

import subprocess
import sys

import pipeline
from pipeline.errors import SluiceError

PUBLIC = [
    "AsyncClient",
    "Client",
    "Handler",
    "ModelLoadError",
    "RecordRejected",
    "Request",
    "RequestError",
    "Response",
    "Settings",
    "SettingsError",
    "SluiceError",
    "Tensor",
    "TopicMissingError",
]


def test_the_public_names_are_pinned_and_resolve() -> None:
    assert pipeline.__all__ == PUBLIC
    assert sorted(pipeline._EXPORTS) == PUBLIC
    for name in PUBLIC:
        assert getattr(pipeline, name) is not None


def test_every_error_sluice_raises_shares_one_base() -> None:
    for name in ("ModelLoadError", "RecordRejected", "RequestError", "SettingsError",
                 "TopicMissingError"):  # fmt: skip
        assert issubclass(getattr(pipeline, name), SluiceError), name


def test_importing_the_client_does_not_import_torch() -> None:
    code = "import pipeline, sys; pipeline.Client; pipeline.Settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
