"""The library messages ``svdfarm worker`` silences (:mod:`cli.noise`), and only those."""

from __future__ import annotations

import logging
import os

import pytest

from cli.noise import silence_library_noise


@pytest.fixture
def clean_loggers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loggers and the environment as they were, after the test."""
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    for name in ("kombu.connection", "transformers.utils.import_utils"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "filters", list(logger.filters))


@pytest.mark.usefixtures("clean_loggers")
def test_the_noise_is_silenced_and_other_warnings_still_show(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """kombu's "No hostname" (embedded broker only) and transformers' torchvision fallback
    are dropped, twice silenced is once; other warnings of the same loggers pass; the
    progress bars of the Hugging Face libraries are off."""
    silence_library_noise(embedded_broker=True)
    silence_library_noise(embedded_broker=True)
    kombu = logging.getLogger("kombu.connection")
    transformers = logging.getLogger("transformers.utils.import_utils")
    assert len(kombu.filters) == 1
    with caplog.at_level(logging.WARNING):
        kombu.warning("No hostname was supplied. Reverting to default 'localhost'")
        transformers.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
            "`CLIPImageProcessorPil` for backward compatibility."
        )
        kombu.warning("Connection to broker lost.")
        transformers.warning("Something a user should read.")
    assert [r.getMessage() for r in caplog.records] == [
        "Connection to broker lost.",
        "Something a user should read.",
    ]
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


@pytest.mark.usefixtures("clean_loggers")
def test_a_broker_url_without_a_host_still_warns_off_the_embedded_broker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On Redis, ``redis://`` without a host may be a mistake: kombu's warning stays."""
    silence_library_noise(embedded_broker=False)
    with caplog.at_level(logging.WARNING):
        logging.getLogger("kombu.connection").warning("No hostname was supplied.")
    assert len(caplog.records) == 1
