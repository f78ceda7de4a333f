"""The JSON API's OpenAPI 3.1 document, served at ``GET /api/v1/openapi.json``.

Written by hand to say what the API really does, status by status; the fields' types and ranges
come from :data:`svdfarm.params.FIELDS`, the validator's own table, so they cannot drift apart.
``tests/web/test_openapi.py`` checks the document is valid, lists every route of the API, and
runs schemathesis over it against the app.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from svdfarm.jobs import MAX_IDEMPOTENCY_KEY
from svdfarm.params import FIELDS, MAX_SIDE, MIN_SIDE, PRECISIONS, SIZE_MULTIPLE
from svdfarm.states import AttemptOutcome, ErrorClass, EventType, JobState, Phase

bp = Blueprint("openapi", __name__, url_prefix="/api/v1")

#: Printable ASCII without spaces at either end, as ``check_idempotency_key`` accepts it
#: (HTTP drops spaces around a header's value, so none can be sent there anyway).
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]([ -~]*[!-~])?$"


NOT_ACCEPTABLE = "The request's Accept header rules out application/json, the only answer."


def _ref(name: str) -> dict[str, str]:
    """A reference to a schema of the document's components."""
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or null (OpenAPI 3.1 / JSON Schema 2020-12 style)."""
    return {"anyOf": [schema, {"type": "null"}]}


def _json(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    """A response with a JSON body of ``schema``."""
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
        **extra,
    }


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    """A refusal: the error body, with a ``Retry-After`` header when the client should wait."""
    response = _json(_ref("Error"), description)
    if retry_after:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    return response


def _field_schemas() -> dict[str, Any]:
    """The form fields of a submission, with the validator's types and ranges."""
    properties: dict[str, Any] = {}
    for name, field in FIELDS.items():
        is_int = field.kind is int
        schema: dict[str, Any] = {
            "type": "integer" if is_int else "number",
            "minimum": int(field.minimum) if is_int else field.minimum,
            "maximum": int(field.maximum) if is_int else field.maximum,
            "description": f"{field.label}: {field.help} Blank or absent: the default.",
        }
        if name in ("width", "height"):
            schema["multipleOf"] = SIZE_MULTIPLE
            schema["description"] = (
                f"{field.label} in pixels, a multiple of {SIZE_MULTIPLE} from {MIN_SIDE} to "
                f"{MAX_SIDE}. Give both width and height, or neither: the image's aspect ratio "
                "at the model's native area."
            )
        description = schema.pop("description")
        # A blank field means its default (as in the form), so "" is part of the document.
        properties[name] = {"anyOf": [schema, BLANK], "description": description}
    properties["precision"] = {
        "type": "string",
        "enum": [*PRECISIONS, ""],
        "description": "auto picks the fastest precision the worker supports; blank: auto.",
    }
    return properties


#: A blank form field: the field's default.
BLANK: dict[str, Any] = {"type": "string", "maxLength": 0}


def _submission() -> dict[str, Any]:
    """The multipart body of ``POST /api/v1/jobs``."""
    return {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {
                "type": "string",
                "format": "binary",
                "description": "A PNG, JPEG or WebP image (checked by its content, not its "
                "name), at least 16 pixels a side, within the upload and pixel limits.",
            },
            **_field_schemas(),
        },
        "dependentRequired": {"width": ["height"], "height": ["width"]},
        # Unknown fields are refused (400), never ignored: "frames=14" is not num_frames.
        "additionalProperties": False,
    }


def _job() -> dict[str, Any]:
    """A job as ``GET /api/v1/jobs/{job_id}`` shows it (``web.jobs.job_json``)."""
    text = {"type": "string"}
    url = {"type": "string", "format": "uri"}
    moment = {"type": "string", "format": "date-time"}
    params = {
        "type": "object",
        "required": [*FIELDS, "precision"],
        "properties": {
            **{
                name: {"type": "integer" if field.kind is int else "number"}
                for name, field in FIELDS.items()
            },
            "precision": {"type": "string", "enum": list(PRECISIONS)},
        },
        "additionalProperties": False,
    }
    properties: dict[str, Any] = {
        "id": {"type": "string", "format": "uuid"},
        "state": _ref("JobState"),
        "phase": {
            **text,
            "enum": [p.value for p in Phase],
        },
        "phase_text": {**text, "description": "The waiting reason, else phase_label."},
        "phase_label": {**text, "description": "The phase as a person reads it."},
        "waiting": _nullable({**text, "description": "Why a queued job waits."}),
        "queue": {**text, "description": "The Celery queue the job was routed to."},
        "memory_estimate_bytes": {"type": "integer", "minimum": 0},
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "step": {"type": "integer", "minimum": 0},
        "eta_s": _nullable({"type": "number", "minimum": 0}),
        "eta_text": _nullable(text),
        "model": text,
        "params": params,
        "input_filename": {**text, "description": "The client's file name, shown, never used."},
        "created_at": moment,
        "started_at": _nullable(moment),
        "finished_at": _nullable(moment),
        "expires_at": _nullable(
            {
                **moment,
                "description": "When retention deletes the outputs (SVDFARM_RETENTION after "
                "the job ended); null while it runs, when kept forever, or once expired.",
            }
        ),
        "expired": {
            "type": "boolean",
            "description": "The outputs were deleted by retention: no video_url any more.",
        },
        "expired_at": _nullable(moment),
        "attempts": {"type": "array", "items": _ref("Attempt")},
        "video_url": _nullable(
            {**url, "description": "The MP4, once the job succeeded (until it expires)."}
        ),
        "poster_url": _nullable(url),
        "error": _nullable(text),
        "status_url": url,
        "page_url": url,
    }
    return {
        "type": "object",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": False,
    }


def _attempt() -> dict[str, Any]:
    """One attempt of a job (``web.jobs.attempt_json``; no traceback: that is for the admin)."""
    moment = {"type": "string", "format": "date-time"}
    properties: dict[str, Any] = {
        "number": {"type": "integer", "minimum": 1},
        "worker": {"type": "string"},
        "plan_name": {"type": "string"},
        "plan": {"type": "object"},
        "outcome": {"type": "string", "enum": [o.value for o in AttemptOutcome]},
        "error_class": _nullable({"type": "string", "enum": [e.value for e in ErrorClass]}),
        "error_type": _nullable({"type": "string"}),
        "message": _nullable({"type": "string"}),
        "started_at": moment,
        "finished_at": _nullable(moment),
        "duration_s": _nullable({"type": "number", "minimum": 0}),
        "peak_memory_bytes": _nullable({"type": "integer", "minimum": 0}),
    }
    return {
        "type": "object",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": False,
    }


def _components() -> dict[str, Any]:
    """The shared schemas, parameters and headers."""
    return {
        "schemas": {
            "Submission": _submission(),
            "Created": {
                "type": "object",
                "required": ["id", "state", "status_url"],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "state": _ref("JobState"),
                    "status_url": {"type": "string", "format": "uri"},
                },
                "additionalProperties": False,
            },
            "Job": _job(),
            "Attempt": _attempt(),
            "JobState": {"type": "string", "enum": [s.value for s in JobState]},
            "JobEvent": _event(),
            "JobEvents": {
                "type": "object",
                "required": ["events"],
                "properties": {"events": {"type": "array", "items": _ref("JobEvent")}},
                "additionalProperties": False,
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {"type": "string", "minLength": 1, "description": "What was wrong."},
                    "fields": {
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                        "description": "For a refused submission: field name (or image, job, "
                        "Idempotency-Key) -> what is wrong with it.",
                    },
                },
                "additionalProperties": False,
            },
            "Health": {
                "type": "object",
                "required": ["status", "database"],
                "properties": {
                    "status": {"type": "string", "enum": ["ok", "error"]},
                    "database": {"type": "string"},
                },
                "additionalProperties": False,
            },
        },
        "parameters": {
            "JobId": {
                "name": "job_id",
                "in": "path",
                "required": True,
                "description": "The job's id, as POST /api/v1/jobs answered it.",
                "schema": {"type": "string", "format": "uuid"},
            },
        },
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            },
        },
    }


def _submit_operation() -> dict[str, Any]:
    """``POST /api/v1/jobs``."""
    return {
        "operationId": "submitJob",
        "summary": "Submit an image to animate",
        "description": "Validates the image and every field, records the job, stores the "
        "image under a generated name and queues the job. A refused request writes nothing.",
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Makes retries safe: the same key with the same request answers "
                "with the job the first request made (and Idempotent-Replayed: true).",
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_IDEMPOTENCY_KEY,
                    "pattern": IDEMPOTENCY_KEY_PATTERN,
                },
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": _ref("Submission"),
                    "encoding": {"image": {"contentType": "image/png, image/jpeg, image/webp"}},
                }
            },
        },
        "responses": {
            "201": _json(
                _ref("Created"),
                "Recorded and queued (or, with a known Idempotency-Key, the earlier job).",
                headers={
                    "Location": {
                        "description": "The job's status URL.",
                        "required": True,
                        "schema": {"type": "string", "format": "uri"},
                    },
                    "Idempotent-Replayed": {
                        "description": "Present when the Idempotency-Key named an earlier job.",
                        "schema": {"type": "string", "enum": ["true"]},
                    },
                },
                links={
                    "GetJob": {
                        "operationId": "getJob",
                        "parameters": {"job_id": "$response.body#/id"},
                    },
                    "CancelJob": {
                        "operationId": "cancelJob",
                        "parameters": {"job_id": "$response.body#/id"},
                    },
                },
            ),
            "400": _error(
                "A field is unknown, repeated, out of range or of the wrong type, the image is "
                "missing, damaged or too small, the job is too large for every worker class, or "
                "the Idempotency-Key is malformed; fields says which (an unknown field's "
                "message lists the accepted ones)."
            ),
            "413": _error("The body or the image is over the upload or pixel limit."),
            "415": _error(
                "The file is not a PNG, JPEG or WebP image, or the body is not multipart/form-data."
            ),
            "422": _error("The Idempotency-Key was used before for a different request."),
            "429": _error("Too many submissions from this client this minute.", True),
            "503": _error("The farm's queue is full, or the database is unavailable.", True),
        },
    }


def _event() -> dict[str, Any]:
    """One event of a job, as ``GET /api/v1/jobs/{job_id}/events`` lists it."""
    return {
        "type": "object",
        "required": ["id", "type", "at", "actor", "details"],
        "properties": {
            "id": {"type": "integer", "description": "Increases with every event."},
            "type": {"type": "string", "enum": [t.value for t in EventType]},
            "at": {"type": "string", "format": "date-time"},
            "actor": {
                "type": "string",
                "description": "web, api, admin, cli, worker:<hostname> or reaper:<hostname>.",
            },
            "details": {"type": "object", "description": "Queue, plan, error class, overrides."},
        },
        "additionalProperties": False,
    }


def _job_operation(operation_id: str, summary: str, ok: str, ok_text: str) -> dict[str, Any]:
    """An operation on one job by its id."""
    return {
        "operationId": operation_id,
        "summary": summary,
        "parameters": [{"$ref": "#/components/parameters/JobId"}],
        "responses": {
            ok: _json(_ref("Job"), ok_text),
            "404": _error("No job has this id (or it is not a UUID)."),
            "503": _error("The database is unavailable.", True),
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the JSON API and ``/healthz``."""
    cancel = _job_operation(
        "cancelJob",
        "Cancel a job",
        "202",
        "Canceled (a queued job) or asked to stop at the next step (a running one).",
    )
    cancel["responses"]["409"] = _error("The job has already ended: nothing to cancel.")
    events = _job_operation(
        "getJobEvents", "A job's events", "200", "Every move of its state and phase, in order."
    )
    events["responses"]["200"] = _json(_ref("JobEvents"), "The job's events, oldest first.")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "svdfarm API",
            "version": "1",
            "description": "Submit an image to Stable Video Diffusion, follow the job, cancel "
            "it. The API uses no cookies and needs no CSRF token. Errors are "
            '{"error": "...", "fields": {...}}.',
            "license": {"name": "Apache License 2.0", "identifier": "Apache-2.0"},
        },
        # Relative: the farm that serves this document, wherever it is deployed.
        "servers": [{"url": "/", "description": "The farm that serves this document."}],
        # No credentials: anyone who can reach the farm may submit, and a job's id is what
        # lets one read or cancel it. (The admin pages have a login; they are not the API.)
        "security": [],
        "paths": {
            "/api/v1/jobs": {"post": _submit_operation()},
            "/api/v1/jobs/{job_id}": {
                "get": _job_operation(
                    "getJob", "A job's state", "200", "The job's state, progress and attempts."
                )
            },
            "/api/v1/jobs/{job_id}/events": {"get": events},
            "/api/v1/jobs/{job_id}/cancel": {"post": cancel},
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": _json({"type": "object"}, "The OpenAPI document."),
                        "406": _error(NOT_ACCEPTABLE),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Is the web up, and can it reach its database?",
                    "responses": {
                        "200": _json(_ref("Health"), "The database answers."),
                        "406": _error(NOT_ACCEPTABLE),
                        "503": _json(_ref("Health"), "The database does not answer."),
                    },
                }
            },
        },
        "components": _components(),
    }


@bp.get("/openapi.json")
def document() -> Any:
    """The OpenAPI document of this API (406 when the request accepts no JSON)."""
    from web.api import not_acceptable

    return not_acceptable() or jsonify(openapi_document())
