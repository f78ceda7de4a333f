"""Fixtures of the core's tests."""

from __future__ import annotations

import pytest
from celery import Celery

from svdfarm.celery_app import create_celery
from svdfarm.settings import Settings


@pytest.fixture
def calm(settings: Settings) -> Settings:
    """The product's dispatch margin (0): a queue is sent only what its idle workers take."""
    settings = settings.with_overrides(dispatch_margin=0)
    settings.ensure_dirs()
    return settings


@pytest.fixture
def celery(calm: Settings) -> Celery:
    """A Celery app on the test's embedded broker (with :func:`calm` settings; a module may
    define its own)."""
    return create_celery(calm)
