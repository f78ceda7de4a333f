"""svdfarm: a render farm for Stable Video Diffusion image-to-video.

``celery -A svdfarm ...`` finds the Celery app through :func:`__getattr__`, so importing
this package stays cheap for the web side.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Expose the Celery app as ``svdfarm.app`` (and ``svdfarm.celery``) on first use."""
    if name in ("app", "celery"):
        from svdfarm.celery_app import app

        return app
    raise AttributeError(f"module 'svdfarm' has no attribute {name!r}")
