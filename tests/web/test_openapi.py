"""The API's OpenAPI document: valid, complete, true to the validator, and schemathesis finds no
server error and no response that breaks it, against the real app on the tiny model.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from svdfarm.db import upgrade
from svdfarm.models import Attempt, Job, utcnow
from svdfarm.params import FIELDS, SIZE_MULTIPLE
from svdfarm.settings import Settings
from svdfarm.states import AttemptOutcome, ErrorClass, JobState
from svdfarm.storage import FileStore, Store
from tests.conftest import DATABASES, make_settings
from tests.factories import jpeg_bytes, png_bytes, webp_bytes
from tests.rows import job_count
from web import create_app

#: No 5xx, and every status, content type, header and body as the document says.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
#: The owner of schemathesis' key-less calls: its WSGI client sends no REMOTE_ADDR, so the
#: web knows it as the address "unknown" (web.owners); the test client is 127.0.0.1.
SCHEMATHESIS_OWNER = "addr:unknown"
#: Examples per operation and generation mode: enough to reach every branch, under a minute.
EXAMPLES = {"POST /api/v1/jobs": 80}
DEFAULT_EXAMPLES = 40
#: Each operation with the generation modes that apply: schemathesis' valid requests, and
#: requests that break the document on purpose (for operations that take any input).
RUNS = [
    pytest.param(label, mode, id=f"{label}-{mode.value}")
    for label, modes in (
        ("POST /api/v1/jobs", ("positive", "negative")),
        ("GET /api/v1/jobs/{job_id}", ("positive", "negative")),
        ("POST /api/v1/jobs/{job_id}/cancel", ("positive", "negative")),
        ("GET /api/v1/jobs", ("positive", "negative")),
        ("GET /healthz", ("positive",)),
        ("GET /api/v1/openapi.json", ("positive",)),
    )
    for mode in map(GenerationMode, modes)
]


@pytest.fixture
def api_settings(tmp_path: Path, database_url: str, tiny_model_dir: Path) -> Settings:
    """Settings with no per-client submit limit (the run submits many jobs from one address)."""
    result = make_settings(tmp_path / "var", database_url, tiny_model_dir, SVDFARM_SUBMIT_RATE="0")
    upgrade(result.database_url)
    return result


@pytest.fixture
def api_app(api_settings: Settings) -> Iterator[Flask]:
    """The app on :func:`api_settings`."""
    flask_app = create_app({"SVDFARM_SETTINGS": api_settings, "TESTING": True})
    yield flask_app
    flask_app.extensions["svdfarm.db"].dispose()


def document(client: FlaskClient) -> dict[str, Any]:
    """The served OpenAPI document."""
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    return body


def test_the_document_is_valid_openapi_3_1(client: FlaskClient) -> None:
    """The document passes the OpenAPI 3.1 meta-schema, and so does each of its JSON schemas;
    the same check refuses a damaged copy, so it is not a check that always passes."""
    doc = document(client)
    assert doc["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(doc).validate()
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name

    damaged = copy.deepcopy(doc)
    damaged["paths"]["/api/v1/jobs"]["post"]["responses"]["201"] = {"content": 3}
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(damaged).validate()


#: The Redocly CLI the lint test runs (pinned: a new release may add rules).
REDOCLY = "@redocly/cli@2.77.0"


def redocly_lint(folder: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """``redocly lint`` with its recommended ruleset on ``doc``: its JSON report."""
    npx = shutil.which("npx")
    if npx is None:
        pytest.skip("npx (Node.js) is not installed: the Redocly CLI cannot run")
    (folder / "openapi.json").write_text(json.dumps(doc))
    quiet = {"REDOCLY_TELEMETRY": "off", "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true"}
    result = subprocess.run(
        [npx, "--yes", REDOCLY, "lint", "--extends=recommended", "--format=json", "openapi.json"],
        cwd=folder,  # no redocly.yaml of anyone's in the way
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **quiet},
    )
    assert result.stdout.strip(), result.stderr[-2000:]
    report: dict[str, Any] = json.loads(result.stdout)
    report["returncode"] = result.returncode
    return report


def test_the_document_passes_redoclys_recommended_rules(
    client: FlaskClient, tmp_path: Path
) -> None:
    """The real ``redocly lint`` (through npx) finds no error and no warning: servers,
    security (none needed, said so), a licence, a 4xx answer on every operation. The same lint
    fails the document as it was before, so it is not a check that always passes."""
    doc = document(client)
    report = redocly_lint(tmp_path, doc)
    problems = [(p["ruleId"], p["message"]) for p in report["problems"]]
    assert report["totals"] == {"errors": 0, "warnings": 0, "ignored": 0}, problems
    assert report["returncode"] == 0

    before = copy.deepcopy(doc)
    for key in ("servers", "security"):
        del before[key]
    del before["components"]["securitySchemes"]  # unused without the document's security
    del before["info"]["license"]
    del before["paths"]["/healthz"]["get"]["responses"]["406"]
    failed = redocly_lint(tmp_path, before)
    assert failed["returncode"] != 0
    assert {p["ruleId"] for p in failed["problems"]} == {
        "no-empty-servers",
        "security-defined",
        "info-license",
        "operation-4xx-response",
    }


@pytest.mark.parametrize("path", ["/api/v1/openapi.json", "/healthz"])
def test_json_only_answers_refuse_an_accept_without_json(client: FlaskClient, path: str) -> None:
    """The documented 4xx of the document and /healthz: 406 when the client accepts no JSON;
    no Accept, */* or a browser's Accept get the JSON."""
    refused = client.get(path, headers={"Accept": "text/html"})
    assert refused.status_code == 406
    assert "application/json only" in refused.get_json()["error"]
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    for accept in (None, "*/*", "application/json", browser):
        headers = {"Accept": accept} if accept else {}
        assert client.get(path, headers=headers).status_code == 200, accept


def test_unknown_fields_are_documented_as_refused(client: FlaskClient) -> None:
    """The submission schema allows no other property, as the API refuses them (400)."""
    submission = document(client)["components"]["schemas"]["Submission"]
    assert submission["additionalProperties"] is False
    response = _submit(client, frames="14")
    assert response.status_code == 400
    assert "did you mean num_frames?" in response.get_json()["fields"]["frames"]


def _documented_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: ``<job_id>`` becomes ``{job_id}``."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_every_api_route_is_documented_and_nothing_else(app: Flask, client: FlaskClient) -> None:
    """Each route of the ``api`` blueprint (and /healthz, the document itself) is in the
    document with its methods, and the document names no route the app does not have."""
    doc = document(client)
    served: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.split(".")[0] not in ("api", "streams", "openapi", "health"):
            continue
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            served.add((_documented_path(rule.rule), method.lower()))
    assert {m for m in served if m[0].startswith("/api/v1/jobs")} >= {
        ("/api/v1/jobs", "post"),
        ("/api/v1/jobs/{job_id}", "get"),
        ("/api/v1/jobs/{job_id}/cancel", "post"),
    }
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == served


def _submit(client: FlaskClient, **fields: str) -> Any:
    """POST a job with a real PNG and ``fields``."""
    form: dict[str, Any] = {"image": (io.BytesIO(png_bytes()), "in.png"), **fields}
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")


def _boundaries(name: str, schema: dict[str, Any]) -> list[tuple[str, bool]]:
    """Values at and just past the documented range of a field, each with whether it is valid."""
    low, high = schema["minimum"], schema["maximum"]
    step = 1 if schema["type"] == "integer" else 0.001
    cases = [(low, True), (high, True), (low - step, False), (high + step, False)]
    if "multipleOf" in schema:
        cases.append((low + schema["multipleOf"] // 2, False))
    return [(str(value), valid) for value, valid in cases]


def test_the_documented_ranges_are_the_validators(api_app: Flask) -> None:
    """Each field's documented minimum and maximum are accepted and one step past is refused
    with that field named: the document and the validator agree at every edge."""
    client = api_app.test_client()
    submission = document(client)["components"]["schemas"]["Submission"]
    documented = {k: v for k, v in submission["properties"].items() if k in FIELDS}
    assert set(documented) == set(FIELDS)
    # Each field is its number or blank (its default): schemathesis sends "" as a valid value.
    assert all(v["anyOf"][1] == {"type": "string", "maxLength": 0} for v in documented.values())
    fields = {k: v["anyOf"][0] for k, v in documented.items()}
    assert submission["properties"]["precision"]["enum"] == ["auto", "bf16", "fp16", "fp32", ""]
    assert fields["width"]["multipleOf"] == SIZE_MULTIPLE
    for name, schema in fields.items():
        for value, valid in _boundaries(name, schema):
            other = {"width": "height", "height": "width"}.get(name)
            sent = {name: value, **({other: "64"} if other else {})}
            response = _submit(client, **sent)
            errors = response.get_json().get("fields", {})
            if valid:
                assert name not in errors, (sent, response.get_json())
            else:
                assert response.status_code == 400, (sent, response.get_json())
                assert name in errors, (sent, response.get_json())


@pytest.fixture
def known_jobs(api_app: Flask, api_settings: Settings) -> list[str]:
    """Jobs in every state the API shows: queued, canceled, succeeded (video, poster, an
    attempt), failed (two attempts with error classes), running (an attempt under way)."""
    client = api_app.test_client()
    ids = [_submit(client).get_json()["id"] for _ in range(5)]
    assert client.post(f"/api/v1/jobs/{ids[1]}/cancel").status_code == 202
    storage = FileStore(api_settings.storage_dir)
    now = utcnow()
    with api_app.extensions["svdfarm.db"].begin() as session:
        for each in ids:  # schemathesis' calls must see them: they are its (web.owners)
            found = session.get(Job, uuid.UUID(each))
            assert found is not None
            found.owner = SCHEMATHESIS_OWNER
        done = session.get(Job, uuid.UUID(ids[2]))
        failed = session.get(Job, uuid.UUID(ids[3]))
        running = session.get(Job, uuid.UUID(ids[4]))
        assert done is not None and failed is not None and running is not None
        for key in (Store.key(ids[2], "video.mp4"), Store.key(ids[2], "poster.png")):
            storage.write_bytes(key, b"stored")
        done.state, done.phase, done.progress = JobState.SUCCEEDED, "done", 1.0
        done.video_key, done.poster_key = (
            Store.key(ids[2], "video.mp4"),
            Store.key(ids[2], "poster.png"),
        )
        done.started_at, done.finished_at = now, now
        failed.state, failed.error, failed.finished_at = JobState.FAILED, "Out of memory.", now
        running.state, running.phase, running.step, running.progress = (
            JobState.RUNNING,
            "denoising",
            2,
            0.5,
        )
        running.started_at = now
        session.add_all(
            [
                Attempt(
                    job_id=done.id,
                    number=1,
                    worker="w1",
                    plan_name="fp32",
                    plan={},
                    outcome=AttemptOutcome.SUCCEEDED,
                    finished_at=now,
                    duration_s=1.5,
                    peak_memory_bytes=1024,
                ),
                Attempt(
                    job_id=failed.id,
                    number=1,
                    worker="w1",
                    plan_name="fp16",
                    plan={"a": 1},
                    outcome=AttemptOutcome.FAILED,
                    error_class=ErrorClass.OUT_OF_MEMORY,
                    error_type="OutOfMemoryError",
                    message="CUDA out of memory",
                    finished_at=now,
                    duration_s=0.5,
                ),
                Attempt(
                    job_id=failed.id,
                    number=2,
                    worker="w2",
                    plan_name="fp32",
                    plan={},
                    outcome=AttemptOutcome.FAILED,
                    error_class=ErrorClass.OTHER,
                    finished_at=now,
                ),
                Attempt(
                    job_id=running.id,
                    number=1,
                    worker="w1",
                    plan_name="fp32",
                    plan={},
                    started_at=now,
                ),
            ]
        )
    return ids


def _strategy(schema: Any, label: str, mode: GenerationMode) -> Any:
    """Schemathesis' cases for one operation."""
    found = [r.ok() for r in schema.get_all_operations() if r.ok().label == label]
    assert len(found) == 1, label
    return found[0].as_strategy(mode)


#: Real images of each accepted type: without them every generated upload is noise (415/400)
#: and the record, store and enqueue steps would never run.
IMAGES = [None, png_bytes(96, 64), jpeg_bytes(80, 48), webp_bytes(64, 64)]


def api_schema(app: Flask) -> Any:
    """The served document, loaded by schemathesis, calling ``app`` in-process.

    ``from_dict`` rather than ``from_wsgi``: the latter leaves the document's own route out.
    """
    schema = schemathesis.openapi.from_dict(document(app.test_client()))
    schema.app = app
    return schema


@pytest.mark.parametrize(("label", "mode"), RUNS)
@pytest.mark.usefixtures("same_examples")
def test_schemathesis_finds_no_server_error_and_no_broken_response(
    api_app: Flask, api_settings: Settings, known_jobs: list[str], label: str, mode: Any
) -> None:
    """Generated requests (valid ones, and ones that break the document on purpose) are never
    answered 5xx, and every answer's status, type, headers and body match the document.

    Some uploads are swapped for real images and some job ids for real jobs, so the valid
    requests reach the database, the storage and the broker, and the read, cancel and 409
    answers are checked too.
    """
    schema = api_schema(api_app)
    statuses: Counter[int] = Counter()
    jobs_before = job_count(api_app)

    @hypothesis_settings(
        max_examples=EXAMPLES.get(label, DEFAULT_EXAMPLES),
        deadline=None,
        database=None,  # no .hypothesis folder in the checkout
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(
        case=_strategy(schema, label, mode),
        image=st.sampled_from(IMAGES),
        job=st.sampled_from([None, *known_jobs]),
    )
    def run(case: Any, image: bytes | None, job: str | None) -> None:
        if image is not None and isinstance(case.body, dict) and "image" in case.body:
            case.body["image"] = image
        if job is not None and "job_id" in (case.path_parameters or {}):
            case.path_parameters["job_id"] = job
        response = case.call_and_validate(checks=CHECKS)
        statuses[response.status_code] += 1
        if response.status_code == 201:
            new_ids.add(response.json()["id"])

    new_ids: set[str] = set()
    run()
    assert statuses and max(statuses) < 500, statuses
    created = job_count(api_app) - jobs_before
    queued = len(list((api_settings.broker_dir / "queue").iterdir()))
    if label == "POST /api/v1/jobs" and mode is GenerationMode.POSITIVE:
        assert statuses[201] >= 5, statuses  # the record, store and enqueue steps really ran
        # An Idempotency-Key the generator repeats answers 201 with the same job again.
        assert created == len(new_ids), (created, statuses)
        assert queued == len(known_jobs) + created
    if mode is GenerationMode.NEGATIVE and label == "POST /api/v1/jobs":
        assert created == 0, statuses  # a request that breaks the document writes nothing
    if label == "POST /api/v1/jobs/{job_id}/cancel" and mode is GenerationMode.POSITIVE:
        assert {202, 404, 409} <= set(statuses), statuses


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
@pytest.mark.usefixtures("same_examples")
def test_schemathesis_submits_on_both_databases(api_app: Flask, api_settings: Settings) -> None:
    """A shorter run of valid submissions on SQLite and PostgreSQL: no 5xx, every answer as
    documented, and each 201 is one row and one queue message."""
    schema = api_schema(api_app)
    statuses: Counter[int] = Counter()

    @hypothesis_settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(
        case=_strategy(schema, "POST /api/v1/jobs", GenerationMode.POSITIVE),
        image=st.sampled_from(IMAGES[1:]),
    )
    def run(case: Any, image: bytes) -> None:
        case.body["image"] = image
        response = case.call_and_validate(checks=CHECKS)
        statuses[response.status_code] += 1
        if response.status_code == 201:
            new_ids.add(response.json()["id"])

    new_ids: set[str] = set()
    run()
    assert max(statuses) < 500, statuses
    assert statuses[201] >= 3, statuses
    # An Idempotency-Key the generator repeats answers 201 with the same job again.
    assert job_count(api_app) == len(new_ids)
    assert len(list((api_settings.broker_dir / "queue").iterdir())) == len(new_ids)


def _operation(schema: Any, label: str) -> Any:
    """One operation of the loaded document."""
    found = [r.ok() for r in schema.get_all_operations() if r.ok().label == label]
    assert len(found) == 1, label
    return found[0]


def _limited_app(tmp_path: Path, database_url: str, tiny_model_dir: Path, **env: str) -> Flask:
    """An app whose settings carry ``env`` (the limits under test)."""
    limited = make_settings(tmp_path / "limited", database_url, tiny_model_dir, **env)
    upgrade(limited.database_url)
    return create_app({"SVDFARM_SETTINGS": limited, "TESTING": True})


def test_the_limit_and_retry_answers_are_as_documented(
    tmp_path: Path, database_url: str, tiny_model_dir: Path
) -> None:
    """Answers schemathesis cannot reach by chance, each checked against the document: an
    Idempotency-Key replay (201, Idempotent-Replayed), its reuse for another image (422), a
    malformed key (400), the per-client limit (429 + Retry-After)."""
    app = _limited_app(tmp_path, database_url, tiny_model_dir, SVDFARM_SUBMIT_RATE="2")
    try:
        submit = _operation(api_schema(app), "POST /api/v1/jobs")

        def send(image: bytes, key: str | None = None) -> Any:
            """One submission through schemathesis, validated against the document."""
            case = submit.Case(
                body={"image": image, "num_frames": 4, "seed": 7},
                media_type="multipart/form-data",
                headers={"Idempotency-Key": key} if key is not None else {},
            )
            return case.call_and_validate(checks=CHECKS)

        first = send(png_bytes(), "retry-1")
        assert first.status_code == 201
        replay = send(png_bytes(), "retry-1")
        assert replay.status_code == 201
        assert replay.headers["idempotent-replayed"] == ["true"]
        assert replay.json()["id"] == first.json()["id"]
        conflict = send(png_bytes(96, 64, (0, 0, 0)), "retry-1")
        assert conflict.status_code == 422
        assert "Idempotency-Key" in conflict.json()["error"]
        assert send(png_bytes(), "x" * 256).status_code == 400
        assert send(png_bytes()).status_code == 201
        limited = send(png_bytes())
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"][0]) >= 1
        assert "per minute" in limited.json()["error"]
        assert job_count(app) == 2
    finally:
        app.extensions["svdfarm.db"].dispose()


def test_a_full_queue_answers_503_as_documented(
    tmp_path: Path, database_url: str, tiny_model_dir: Path
) -> None:
    """With SVDFARM_MAX_QUEUED=1 the second submission is refused 503 with Retry-After, as the
    document says (a deliberate 503, so only the conformance checks apply)."""
    full = _limited_app(
        tmp_path, database_url, tiny_model_dir, SVDFARM_SUBMIT_RATE="0", SVDFARM_MAX_QUEUED="1"
    )
    try:
        submit = _operation(api_schema(full), "POST /api/v1/jobs")
        body = {"image": png_bytes()}
        first = submit.Case(body=body, media_type="multipart/form-data").call_and_validate(
            checks=CHECKS
        )
        assert first.status_code == 201
        refused = submit.Case(body=body, media_type="multipart/form-data").call_and_validate(
            checks=CHECKS[1:]
        )
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"][0]) >= 1
        assert "full" in refused.json()["error"]
        assert job_count(full) == 1
    finally:
        full.extensions["svdfarm.db"].dispose()
