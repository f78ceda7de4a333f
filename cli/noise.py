"""Messages libraries print in ``svdfarm worker`` (and ``web``) that their user cannot act on,
and their silencing.

Each is silenced by name, so any other warning from the same library still shows:

* kombu warns "No hostname was supplied. Reverting to default 'localhost'" at every
  connection to the embedded broker (a worker's, and the web's first publish), whose URL
  (``filesystem://``) has no host by design;
* transformers warns that ``CLIPImageProcessor`` needs torchvision and falls back to the PIL
  one, which is the one SVD's feature extractor needs anyway;
* transformers', diffusers' and huggingface_hub's progress bars (writing the tiny model's
  shards, loading checkpoint shards) reach a worker's log as WARNING lines, because Celery
  logs what a worker writes to stderr; the job's own progress is in the database.
"""

from __future__ import annotations

import logging
import os

#: (logger, the start of a message it logs) for each warning silenced.
SILENCED = (("transformers.utils.import_utils", "`CLIPImageProcessor` requires torchvision"),)
#: Silenced only with the embedded broker: elsewhere a URL without a host may be a mistake.
EMBEDDED_BROKER_SILENCED = (("kombu.connection", "No hostname was supplied"),)


class _Drop(logging.Filter):
    """Drops the records whose message starts with ``start``."""

    def __init__(self, start: str) -> None:
        """Drop messages starting with ``start``."""
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop it) for a message starting with ``start``."""
        return not record.getMessage().startswith(self.start)

    def __eq__(self, other: object) -> bool:
        """One filter per message, however often the worker silences them."""
        return isinstance(other, _Drop) and other.start == self.start

    def __hash__(self) -> int:
        """Hash by the message silenced."""
        return hash(self.start)


def silence_library_noise(*, embedded_broker: bool) -> None:
    """Silence the messages above in this process and the ones it forks or starts.

    Call it before torch, transformers or diffusers are imported: the progress bars' switch
    is read when they are.
    """
    silenced = SILENCED + (EMBEDDED_BROKER_SILENCED if embedded_broker else ())
    for name, start in silenced:
        logging.getLogger(name).addFilter(_Drop(start))  # addFilter skips an equal one
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
