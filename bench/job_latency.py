"""Time jobs through a whole farm: ``svdfarm up`` in a temporary data folder, N jobs submitted
over HTTP one after another, each timed from submit to running and to succeeded.

    .venv/bin/python bench/job_latency.py --jobs 5 [--frames 8 --steps 4] [--model tiny]

The first job pays the worker's imports and the model load; the rest show the farm's steady
cost. Prints one line per job and a summary; exits non-zero if a job does not succeed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from PIL import Image


def _free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _png(width: int, height: int) -> bytes:
    """A gradient PNG."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _post_job(base: str, fields: dict[str, str], image: bytes) -> str:
    """POST a multipart job; returns its status URL."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    )
    body += (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{base}/api/v1/jobs",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.load(response)["status_url"])


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="width and height")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--broker", default="", help="SVDFARM_BROKER_URL (default: embedded)")
    parser.add_argument("--database", default="", help="SVDFARM_DATABASE_URL (default: SQLite)")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="svdfarm-bench-"))
    port = _free_port()
    env = {
        **os.environ,
        "SVDFARM_DATA_DIR": str(data_dir),
        "SVDFARM_MODEL": args.model,
        "SVDFARM_BROKER_URL": args.broker,
        "SVDFARM_DATABASE_URL": args.database,
        "SVDFARM_QUEUE": f"bench-{uuid.uuid4().hex[:6]}",
    }
    log = open(data_dir / "up.log", "wb")  # noqa: SIM115 - closed at the end
    up = subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    results: list[tuple[float, float]] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or up.poll() is not None:
                    print((data_dir / "up.log").read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.2)
        fields = {
            "num_frames": str(args.frames),
            "num_inference_steps": str(args.steps),
            "width": str(args.size),
            "height": str(args.size),
        }
        image = _png(args.size * 2, args.size * 2)
        for number in range(1, args.jobs + 1):
            started = time.monotonic()
            status_url = _post_job(base, fields, image)
            running_at = None
            while True:
                with urllib.request.urlopen(status_url, timeout=10) as response:
                    job = json.load(response)
                now = time.monotonic()
                if running_at is None and job["state"] != "queued":
                    running_at = now
                if job["state"] in ("succeeded", "failed", "canceled"):
                    break
                time.sleep(0.02)
            if job["state"] != "succeeded":
                print(f"job {number} {job['state']}: {job['error']}", file=sys.stderr)
                return 1
            total = now - started
            to_running = (running_at or now) - started
            results.append((to_running, total))
            print(
                f"job {number}: submit -> running {to_running * 1000:7.0f} ms, "
                f"submit -> succeeded {total:6.2f} s"
            )
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
        log.close()
    warm = [total for _, total in results[1:]] or [results[0][1]]
    print(
        f"{args.jobs} jobs of {args.frames} frames {args.size}x{args.size}, {args.steps} steps, "
        f"model {args.model}: first {results[0][1]:.2f} s, warm median "
        f"{statistics.median(warm):.2f} s (min {min(warm):.2f}, max {max(warm):.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
