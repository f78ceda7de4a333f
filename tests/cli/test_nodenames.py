"""Worker names unique on one machine (:mod:`cli.nodenames`)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cli.nodenames import NameTaken, claim_worker_name, expand


def test_default_names_are_the_lowest_free_and_come_back_when_released(tmp_path: Path) -> None:
    """Each worker takes the first ``worker<N>@<host>`` no running one holds; a stopped
    worker's name is free again at once."""
    host = socket.gethostname()
    first = claim_worker_name("", tmp_path)
    second = claim_worker_name("", tmp_path)
    try:
        assert (first.name, second.name) == (f"worker1@{host}", f"worker2@{host}")
        first.release()
        assert [p.name for p in tmp_path.iterdir()] == [f"worker2@{host}.lock"]  # tidy
        again = claim_worker_name("", tmp_path)
        assert again.name == f"worker1@{host}"
        again.release()
    finally:
        first.release()
        second.release()


def test_a_name_another_worker_holds_is_refused_saying_how_to_name_this_one(
    tmp_path: Path,
) -> None:
    """``--hostname gpu0@%h`` twice: the second is refused with the name, the holder and how
    to choose another; the name is Celery's spelling (``%h`` expanded)."""
    held = claim_worker_name("gpu0@%h", tmp_path)
    try:
        assert held.name == expand("gpu0@%h") == f"gpu0@{socket.gethostname()}"
        with pytest.raises(NameTaken) as refused:
            claim_worker_name("gpu0@%h", tmp_path)
        message = str(refused.value)
        assert f"already named {held.name}" in message
        assert "(pid " in message and "--hostname" in message
    finally:
        held.release()
    claim_worker_name("gpu0@%h", tmp_path).release()  # free once its holder let go
