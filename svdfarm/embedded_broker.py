"""The server-less broker (``filesystem://``): kombu's filesystem transport, each message
written whole before a worker can see it.

kombu's own ``_put`` creates the message file, then locks it, then writes it; a worker listing
the folder in between moves the still-empty file away, fails to parse it and stops, and the
message is lost. Here a message is written under a name the workers ignore (``.part``) and
renamed into place, which is atomic within one folder.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

#: The transport's name for Celery's ``broker_transport`` setting.
TRANSPORT = "svdfarm.embedded_broker:Transport"


class Channel(filesystem.Channel):  # type: ignore[misc]
    """kombu's filesystem channel with whole-message writes."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Put ``payload`` on ``queue``: written beside, then renamed into place."""
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        path = os.path.join(self.data_folder_out, name)
        part = path + ".part"
        try:
            with open(part, "wb") as out:
                out.write(str_to_bytes(dumps(payload)))
            os.replace(part, path)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {path!r} to directory") from exc


class Transport(filesystem.Transport):  # type: ignore[misc]
    """kombu's filesystem transport with :class:`Channel`."""

    Channel = Channel
