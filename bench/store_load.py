"""100 jobs through the farm with the outputs in a local folder, then in S3: the same jobs,
the same processes (one web, one worker, PostgreSQL + Redis), only the store differs.

    .venv/bin/python -m bench.store_load [--jobs 100] [--write]

S3 is moto's server mode on loopback (a real S3 HTTP endpoint; ``SVDFARM_TEST_S3_URL``
``http://KEY:SECRET@host:port`` points it at a MinIO instead). All jobs are submitted at once
from 8 client threads; the run ends when every job has ended, and every job must have
succeeded with its video in the store. Reported: the wall time from the first submit to the
last finish, jobs per minute, the submit latency, and the S3 / folder ratio of the wall time.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import (
    Farm,
    JobParams,
    fmt_ms,
    markdown_table,
    percentile,
    png_bytes,
    scratch_broker,
    scratch_database,
    section,
    submit,
    wait_jobs,
    write_section,
)

#: The cheapest job the tiny model makes: the store's share of each job is what differs.
PARAMS = JobParams(frames=2, steps=1)


@contextmanager
def s3_endpoint() -> Iterator[dict[str, str]]:
    """The environment of an S3 endpoint with a fresh bucket: moto on loopback, or the MinIO
    that ``SVDFARM_TEST_S3_URL`` names."""
    import boto3

    given = os.environ.get("SVDFARM_TEST_S3_URL", "")
    server = None
    if given:
        parts = urlsplit(given)
        endpoint = f"{parts.scheme}://{parts.hostname}:{parts.port}"
        key, secret = parts.username or "", parts.password or ""
    else:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        host, port = server.get_host_and_port()
        endpoint, key, secret = f"http://{host}:{port}", "bench", "bench-secret"
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "SVDFARM_STORAGE_URL": f"s3://{bucket}/farm",
    }
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    try:
        yield env
    finally:
        if server is not None:
            server.stop()


def stored_in_s3(env: dict[str, str], key: str) -> bool:
    """True when the S3 store of ``env`` holds ``key``."""
    import boto3

    bucket, _, prefix = env["SVDFARM_STORAGE_URL"].removeprefix("s3://").partition("/")
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    try:
        client.head_object(Bucket=bucket, Key=f"{prefix}/{key}" if prefix else key)
    except client.exceptions.ClientError:
        return False
    return True


def run(store: str, jobs: int, env: dict[str, str]) -> dict[str, float]:
    """Submit ``jobs`` jobs at once to a fresh farm with ``env``'s store; its figures."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"svdfarm-store-{store}-"))
    image = png_bytes(96, 64)
    try:
        with (
            scratch_database("postgresql", data_dir) as database_url,
            scratch_broker("redis") as broker_url,
            Farm(database_url, broker_url, data_dir, extra_env=env) as farm,
        ):
            latencies: list[float] = []

            def one(_: int) -> str:
                began = time.perf_counter()
                job_id = submit(farm.base, PARAMS, image)
                latencies.append(time.perf_counter() - began)
                return job_id

            started = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(one, range(jobs)))
            records = wait_jobs(farm.engine(), ids, timeout_s=1800)
            wall = time.perf_counter() - started
            for record in records:
                if record.state != "succeeded" or not record.video_key:
                    raise RuntimeError(f"job {record.id} {record.state}: {record.error}")
                if store == "s3":
                    if not stored_in_s3(env, record.video_key):
                        raise RuntimeError(f"job {record.id}: its video is not in the bucket")
                    if (data_dir / "jobs").exists():
                        raise RuntimeError("the S3 run wrote outputs to the local folder")
                elif not (data_dir / "jobs" / record.video_key).is_file():
                    raise RuntimeError(f"job {record.id}: its video is not in the folder")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "wall_s": wall,
        "per_min": jobs / wall * 60,
        "submit_p50": percentile(latencies, 50),
        "submit_p99": percentile(latencies, 99),
    }


def main() -> None:
    """Run both stores, print the table and the ratio, and write the section if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--write", action="store_true", help="rewrite docs/BENCHMARKS.md's part")
    args = parser.parse_args()
    figures = {"folder": run("folder", args.jobs, {})}
    with s3_endpoint() as env:
        figures["s3"] = run("s3", args.jobs, env)
    ratio = figures["s3"]["wall_s"] / figures["folder"]["wall_s"]
    table = markdown_table(
        ["store", "jobs", "wall", "jobs/min", "submit p50", "submit p99"],
        [
            [
                name,
                args.jobs,
                f"{f['wall_s']:.1f} s",
                f"{f['per_min']:.0f}",
                fmt_ms(f["submit_p50"]),
                fmt_ms(f["submit_p99"]),
            ]
            for name, f in figures.items()
        ],
    )
    print(table)
    print(f"s3/folder wall ratio: {ratio:.3f}")
    if args.write:
        notes = (
            f"Each job: {PARAMS.describe()} on the tiny model, one worker, PostgreSQL + Redis; "
            f"S3 is moto's server mode on loopback. **s3/folder wall ratio: {ratio:.3f}.**"
        )
        write_section("store-load", section("100 jobs: S3 store against a folder", table, notes))


if __name__ == "__main__":
    main()
