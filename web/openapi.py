"""The JSON API's OpenAPI 3.1 document, served at ``GET /api/v1/openapi.json``.

Written by hand to say what the API really does, status by status; the fields' types and ranges
come from :data:`svdfarm.params.FIELDS`, the validator's own table, so they cannot drift apart.
``tests/web/test_openapi.py`` checks the document is valid, lists every route of the API, and
runs schemathesis over it against the app.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from svdfarm.batches import MAX_BATCH_IMAGES, MAX_BATCH_JOBS
from svdfarm.jobs import MAX_IDEMPOTENCY_KEY
from svdfarm.params import (
    FIELDS,
    FLAG_FALSE,
    FLAG_TRUE,
    MAX_SIDE,
    MIN_SIDE,
    OUTPUT_FORMATS,
    OUTPUT_FORMATS_PATTERN,
    PRECISIONS,
    SIZE_MULTIPLE,
)
from svdfarm.states import AttemptOutcome, ErrorClass, EventType, JobState, Phase
from svdfarm.users import MAX_PRIORITY, MIN_PRIORITY
from web.jobs import DEFAULT_PAGE, MAX_PAGE

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


def _unauthorized() -> dict[str, Any]:
    """401: a bad API key (either mode), or none where the farm needs one (keys mode)."""
    response = _error(
        "The API key sent is unknown, malformed or revoked, or its user is disabled; or the "
        "farm runs with SVDFARM_AUTH=keys and the request has no key (nor a login session)."
    )
    response["headers"] = {"WWW-Authenticate": {"$ref": "#/components/headers/WWW-Authenticate"}}
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
    properties["min_guidance_scale"]["description"] += (
        " Above max_guidance_scale is refused when both are given; a blank max follows it."
    )
    properties["max_guidance_scale"]["description"] += (
        " Below min_guidance_scale is refused when both are given; a blank min follows it."
    )
    properties["model"] = {
        "type": "string",
        "maxLength": 1000,
        "description": "A model of GET /api/v1/models, by id (svd-xt, tiny, ...) or source. "
        "Blank: the first one a live worker serves. An unknown model is refused (400) with the "
        "known ones listed.",
    }
    properties.update(_output_schemas())
    properties["priority"] = {
        "anyOf": [{"type": "integer", "minimum": MIN_PRIORITY, "maximum": MAX_PRIORITY}, BLANK],
        "description": f"Dispatch priority, {MIN_PRIORITY} to {MAX_PRIORITY}: higher runs first. "
        "Above the owner's own limit (0 for anonymous clients) is refused with 403. Blank: 0.",
    }
    properties["webhook_url"] = {
        "type": "string",
        "maxLength": 2000,
        "description": "An http:// or https:// URL (no user:password@, at most 2000 "
        "characters) the farm POSTs the job's events to: job.queued, job.started, "
        "job.succeeded, job.failed, job.canceled, each signed with the owner's secret (GET "
        "/api/v1/webhooks/secret; docs/WEBHOOKS.md). A literal loopback, private, link-local "
        "or other non-public address is refused (400) unless the farm allows them "
        "(SVDFARM_WEBHOOK_ALLOW_PRIVATE). Blank: none.",
    }
    return properties


def _output_schemas() -> dict[str, Any]:
    """The output fields of a submission: the formats to write and the loop."""
    return {
        "output_formats": {
            "type": "string",
            "pattern": OUTPUT_FORMATS_PATTERN,
            "description": f"Comma-separated, among {', '.join(OUTPUT_FORMATS)}: the MP4 is "
            "always made; webm is VP9, gif loops forever, frames is a zip of PNGs. Blank: mp4.",
        },
        "loop": {
            "type": "string",
            "enum": [*FLAG_TRUE, *FLAG_FALSE],
            "description": "Ping-pong: the frames play forward, then backward. Blank: false.",
        },
    }


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


def _batch_submission() -> dict[str, Any]:
    """The multipart body of ``POST /api/v1/batches``: images, a submission's fields, seeds."""
    fields = _field_schemas()
    return {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_BATCH_IMAGES,
                "items": {"type": "string", "format": "binary"},
                "description": "One part named image per picture (PNG, JPEG or WebP), each "
                "within the upload and pixel limits.",
            },
            **fields,
            "seeds": {
                "type": "string",
                "pattern": r"^ *[0-9]+ *(, *[0-9]+ *)*$",
                "description": "Comma-separated seeds, each rendered for every image (not with "
                f"seed or count). At most {MAX_BATCH_JOBS} jobs in all.",
            },
            "count": {
                "anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_BATCH_JOBS}, BLANK],
                "description": "How many videos per image: seeds from seed upwards, or random "
                "ones (not with seeds).",
            },
        },
        "dependentRequired": {"width": ["height"], "height": ["width"]},
        "additionalProperties": False,
    }


def _batch_created() -> dict[str, Any]:
    """The answer to ``POST /api/v1/batches``."""
    url = {"type": "string", "format": "uri"}
    job = {
        "type": "object",
        "required": ["id", "state", "seed", "input_filename", "status_url"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "state": _ref("JobState"),
            "seed": {"type": "integer", "minimum": 0},
            "input_filename": {"type": "string"},
            "status_url": url,
        },
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "required": ["id", "status_url", "page_url", "jobs"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "status_url": url,
            "page_url": url,
            "jobs": {"type": "array", "minItems": 1, "items": job},
        },
        "additionalProperties": False,
    }


def _batch() -> dict[str, Any]:
    """A batch as ``GET /api/v1/batches/{batch_id}`` shows it (``web.jobs.batch_json``)."""
    url = {"type": "string", "format": "uri"}
    properties: dict[str, Any] = {
        "id": {"type": "string", "format": "uuid"},
        "created_at": {"type": "string", "format": "date-time"},
        "done": {"type": "boolean", "description": "Every job has ended."},
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "counts": {
            "type": "object",
            "propertyNames": {"enum": [s.value for s in JobState]},
            "additionalProperties": {"type": "integer", "minimum": 1},
            "description": "How many jobs are in each state.",
        },
        "jobs": {"type": "array", "items": _ref("Job")},
        "outputs_url": {
            **url,
            "description": "A zip of every output made so far (404 while there is none).",
        },
        "status_url": url,
        "page_url": url,
    }
    return {
        "type": "object",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": False,
    }


def _job() -> dict[str, Any]:
    """A job as ``GET /api/v1/jobs/{job_id}`` shows it (``web.jobs.job_json``)."""
    text = {"type": "string"}
    url = {"type": "string", "format": "uri"}
    moment = {"type": "string", "format": "date-time"}
    params = {
        "type": "object",
        "required": [*FIELDS, "precision", "output_formats", "loop"],
        "properties": {
            **{
                name: {"type": "integer" if field.kind is int else "number"}
                for name, field in FIELDS.items()
            },
            "precision": {"type": "string", "enum": list(PRECISIONS)},
            "output_formats": {
                "type": "string",
                "description": "The formats written, comma-separated, mp4 first.",
            },
            "loop": {"type": "boolean"},
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
        "owner": {
            **text,
            "description": "Who submitted it: the user's name, or anonymous (an admin also "
            "reads other users' names and an anonymous API client's address).",
        },
        "priority": {"type": "integer", "minimum": MIN_PRIORITY, "maximum": MAX_PRIORITY},
        "place": _nullable(_ref("Place")),
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
        "preview_url": _nullable(
            {
                **url,
                "description": "While the job runs, its latest preview: the middle frame of "
                "the denoising latents as a small JPEG under /jobs/<id>/, with ?step=N (the "
                "step it shows) so each new one is a new URL; null before the first, and once "
                "the job ended.",
            }
        ),
        "outputs": {
            "type": "object",
            "propertyNames": {"enum": list(OUTPUT_FORMATS)},
            "additionalProperties": url,
            "description": 'The URL of each output format once the job succeeded ({"mp4": '
            '..., "webm": ...}); empty before, and once retention deleted them.',
        },
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
            "BatchSubmission": _batch_submission(),
            "BatchCreated": _batch_created(),
            "Batch": _batch(),
            "Attempt": _attempt(),
            "Place": {
                "type": "object",
                "description": "A queued job's place in its queue's dispatch order.",
                "required": ["position", "eta_seconds", "held"],
                "properties": {
                    "position": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "0: sent to a worker, it starts next; else its place "
                        "in line (1 = the next one sent).",
                    },
                    "eta_seconds": _nullable(
                        {
                            "type": "number",
                            "minimum": 0,
                            "description": "About when it starts (null: no estimate).",
                        }
                    ),
                    "held": {
                        "type": "string",
                        "description": "Why it waits beyond its turn (the owner's running "
                        "limit), or empty.",
                    },
                },
                "additionalProperties": False,
            },
            "JobList": {
                "type": "object",
                "required": ["jobs", "next_cursor"],
                "properties": {
                    "jobs": {"type": "array", "items": _ref("Job"), "maxItems": MAX_PAGE},
                    "next_cursor": _nullable(
                        {
                            "type": "string",
                            "description": "Pass as cursor for the next page; null on the last.",
                        }
                    ),
                },
                "additionalProperties": False,
            },
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
            "BatchId": {
                "name": "batch_id",
                "in": "path",
                "required": True,
                "description": "The batch's id, as POST /api/v1/batches answered it.",
                "schema": {"type": "string", "format": "uuid"},
            },
        },
        "securitySchemes": {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key (svdf_<id>_<secret>, made by an admin with svdfarm "
                "keys create). Needed with SVDFARM_AUTH=keys; in open mode a client without a "
                "key is known by its address. A key that is sent must be valid (else 401).",
            }
        },
        "headers": {
            "WWW-Authenticate": {
                "description": 'The challenge of a 401: Bearer realm="svdfarm".',
                "required": True,
                "schema": {"type": "string"},
            },
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
            "401": _unauthorized(),
            "403": _error("The priority is above the owner's limit (fields.priority says it)."),
            "422": _error(
                "The Idempotency-Key was used before for a different request, or by another client."
            ),
            "429": _error("Too many submissions from this client this minute.", True),
            "503": _error("The farm's queue is full, or the database is unavailable.", True),
        },
    }


def _batch_operations() -> dict[str, Any]:
    """``POST /api/v1/batches`` and ``GET /api/v1/batches/{batch_id}``."""
    submit = {
        "operationId": "submitBatch",
        "summary": "Submit several images and seeds at once",
        "description": "One job per image and seed, sharing the settings; validated whole "
        "and recorded in one transaction, so a refused batch writes nothing. Its jobs count "
        "against the per-client and queue limits one by one.",
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": _ref("BatchSubmission"),
                    "encoding": {"image": {"contentType": "image/png, image/jpeg, image/webp"}},
                }
            },
        },
        "responses": {
            "201": _json(
                _ref("BatchCreated"),
                "Recorded and queued: the batch and its jobs, images in order, each image's "
                "seeds in order.",
                headers={
                    "Location": {
                        "description": "The batch's status URL.",
                        "required": True,
                        "schema": {"type": "string", "format": "uri"},
                    }
                },
                links={
                    "GetBatch": {
                        "operationId": "getBatch",
                        "parameters": {"batch_id": "$response.body#/id"},
                    }
                },
            ),
            "400": _error(
                "A field is unknown, repeated or out of range, an image is missing or damaged, "
                "the seeds or count are malformed, or the batch makes too many jobs; fields "
                "says which (image 2 for the second image)."
            ),
            "401": _unauthorized(),
            "403": _error("The priority is above the owner's limit (fields.priority says it)."),
            "413": _error("The body or an image is over the upload or pixel limit."),
            "415": _error("A file is not a PNG, JPEG or WebP image, or the body is not multipart."),
            "429": _error("The batch's jobs would pass this client's per-minute limit.", True),
            "503": _error("The farm's queue cannot take the batch's jobs now.", True),
        },
    }
    read = {
        "operationId": "getBatch",
        "summary": "A batch's jobs and progress",
        "parameters": [{"$ref": "#/components/parameters/BatchId"}],
        "responses": {
            "200": _json(_ref("Batch"), "Every job of the batch, and their totals."),
            "401": _unauthorized(),
            "404": _error(
                "No batch has this id (or it is not a UUID), or its jobs are someone else's."
            ),
            "503": _error("The database is unavailable.", True),
        },
    }
    return {"/api/v1/batches": {"post": submit}, "/api/v1/batches/{batch_id}": {"get": read}}


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
            "401": _unauthorized(),
            "404": _error(
                "No job has this id (or it is not a UUID), or it is someone else's (the "
                "same answer, so ids of others' jobs cannot be told from none)."
            ),
            "503": _error("The database is unavailable.", True),
        },
    }


def _models_operation() -> dict[str, Any]:
    """``GET /api/v1/models``: the catalog (``SVDFARM_MODELS``)."""
    model = {
        "type": "object",
        "required": ["id", "source", "defaults", "available"],
        "properties": {
            "id": {"type": "string", "description": "What a job's model field names."},
            "source": {
                "type": "string",
                "description": "What workers load: a Hugging Face Hub id, a folder, or tiny.",
            },
            "defaults": {
                "type": "object",
                "description": "The form's defaults for it; num_frames and native_side (the "
                "side of the square of its native area) from its configs where the farm has "
                "them, else a known checkpoint's; fps and motion_bucket_id at a model's fixed "
                "conditioning (SVD-XT 1.1: 6 and 127); sizes: its width x height presets.",
            },
            "available": {
                "type": "boolean",
                "description": "A live worker serves it now.",
            },
        },
    }
    listing = {
        "type": "object",
        "required": ["models", "default"],
        "properties": {
            "models": {"type": "array", "items": model},
            "default": {
                "type": "string",
                "description": "The id of the first model a live worker serves (else "
                "SVDFARM_MODEL's).",
            },
        },
    }
    return {
        "operationId": "listModels",
        "summary": "The models jobs may name",
        "security": [],
        "responses": {
            "200": _json(listing, "Each model with its defaults and availability."),
            "406": _error(NOT_ACCEPTABLE),
            "503": _error("The database is unavailable.", True),
        },
    }


def _list_operation() -> dict[str, Any]:
    """``GET /api/v1/jobs``: the caller's jobs, newest first, a page at a time."""
    return {
        "operationId": "listJobs",
        "summary": "Your jobs, newest first",
        "description": "The jobs of the caller (the key's user; in open mode without a key, "
        "this address's key-less jobs), newest first by creation time, a page at a time. "
        "Unknown query parameters are refused (400).",
        "parameters": [
            {
                "name": "state",
                "in": "query",
                "required": False,
                "description": "Only the jobs in this state.",
                "schema": _ref("JobState"),
            },
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "description": f"Jobs per page (default {DEFAULT_PAGE}).",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
            },
            {
                "name": "cursor",
                "in": "query",
                "required": False,
                "description": "The next_cursor of the page before (opaque).",
                "schema": {"type": "string"},
            },
        ],
        "responses": {
            "200": _json(_ref("JobList"), "One page of the caller's jobs, and the next's cursor."),
            "400": _error(
                "A query parameter is unknown, repeated or malformed; fields says which."
            ),
            "401": _unauthorized(),
            "503": _error("The database is unavailable.", True),
        },
    }


def _webhook_secret_operation() -> dict[str, Any]:
    """``GET /api/v1/webhooks/secret``: the caller's signing secret."""
    secret = {
        "type": "object",
        "required": ["key"],
        "properties": {
            "key": {
                "type": "string",
                "pattern": "^whsec_[A-Za-z0-9+/=]+$",
                "description": "The secret that signs every webhook delivery of the caller's "
                "jobs (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature).",
            }
        },
    }
    return {
        "operationId": "getWebhookSecret",
        "summary": "Your webhook signing secret",
        "description": "The caller's own owner's secret, made on first use and the same "
        "afterwards. In open mode a caller without a key is its address's anonymous owner and "
        "gets that owner's secret; with SVDFARM_AUTH=keys a caller without a key gets 401.",
        "responses": {
            "200": _json(secret, "The caller's signing secret."),
            "401": _unauthorized(),
            "503": _error("The database is unavailable.", True),
        },
    }


EVENT_STREAM = "text/event-stream"
STREAM_TEXT = (
    "With 'Accept: text/event-stream', a live stream of server-sent events instead: "
    "'event: event' with 'id:' for each event (its JSON as listed here, plus job and state) "
    "and 'event: progress' (no id) with the job's phase, step, steps, progress, ETA and "
    "preview_url (a path) whenever they change. A client that reconnects with Last-Event-ID "
    "(EventSource does) gets every event after it first."
)


def _stream_parameters() -> list[dict[str, Any]]:
    """The parameters that resume an event stream (or page the JSON list) after an event."""
    event_id = {"type": "string", "pattern": "^[0-9]{1,18}$"}
    return [
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "description": "Only the events after this event id (a stream's resume point).",
            "schema": event_id,
        },
        {
            "name": "after",
            "in": "query",
            "required": False,
            "description": "The same as Last-Event-ID, for clients that cannot set headers.",
            "schema": event_id,
        },
    ]


def _stream_content() -> dict[str, Any]:
    """An event stream's content, as OpenAPI describes a ``text/event-stream`` body."""
    return {
        "schema": {
            "type": "string",
            "description": "Server-sent events: 'id:', 'event:' (event or progress) and one "
            "'data:' line of JSON each; a comment every 15 s while quiet.",
        }
    }


def _caller_events_operation() -> dict[str, Any]:
    """``GET /api/v1/events``: the events of all the caller's jobs."""
    page = {
        "type": "object",
        "required": ["events", "last_id"],
        "properties": {
            "events": {"type": "array", "items": _caller_event()},
            "last_id": {
                "type": "integer",
                "description": "The last event's id: pass it as after for the next page.",
            },
        },
        "additionalProperties": False,
    }
    ok = _json(page, "The caller's jobs' events after 'after', oldest first.")
    ok["content"][EVENT_STREAM] = _stream_content()
    return {
        "operationId": "getEvents",
        "summary": "All your jobs' events",
        "description": "The events of every job of the caller, oldest first. "
        + STREAM_TEXT.replace("'event: event'", "'event: event' (of any of its jobs)")
        + " Without Last-Event-ID the stream starts from now.",
        "parameters": [
            *_stream_parameters(),
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "description": "Events in a JSON answer (default 100).",
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
            },
        ],
        "responses": {
            "200": ok,
            "400": _error("A query parameter is unknown or malformed; fields says which."),
            "401": _unauthorized(),
            "503": _error("The database is unavailable.", True),
        },
    }


def _caller_event() -> dict[str, Any]:
    """One event of one of the caller's jobs: a job's event with the job's id."""
    found = _event()
    found["required"] = [*found["required"], "job"]
    found["properties"] = {
        **found["properties"],
        "job": {"type": "string", "format": "uuid", "description": "The job's id."},
    }
    return found


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
    events["description"] = STREAM_TEXT + " The stream ends after the event that ends the job."
    events["parameters"] += _stream_parameters()
    events["responses"]["200"] = _json(_ref("JobEvents"), "The job's events, oldest first.")
    events["responses"]["200"]["content"][EVENT_STREAM] = _stream_content()
    events["responses"]["204"] = {
        "description": "Asked for a stream of a job that has ended, with no event after "
        "Last-Event-ID: nothing more will come (EventSource stops reconnecting)."
    }
    events["responses"]["400"] = _error("Last-Event-ID (or after) is not an event id.")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "svdfarm API",
            "version": "1",
            "description": "Submit an image to Stable Video Diffusion, follow the job, cancel "
            "it. Credentials: an API key as 'Authorization: Bearer <key>' (needed with "
            "SVDFARM_AUTH=keys; in open mode a client without a key is known by its address). "
            "Each caller sees its own jobs only: someone else's job is answered 404. The API "
            "needs no CSRF token. Errors are "
            '{"error": "...", "fields": {...}}.',
            "license": {"name": "Apache License 2.0", "identifier": "Apache-2.0"},
        },
        # Relative: the farm that serves this document, wherever it is deployed.
        "servers": [{"url": "/", "description": "The farm that serves this document."}],
        # An API key, or none (open mode: the client's address owns its jobs).
        "security": [{}, {"apiKey": []}],
        "paths": {
            "/api/v1/jobs": {"post": _submit_operation(), "get": _list_operation()},
            "/api/v1/jobs/{job_id}": {
                "get": _job_operation(
                    "getJob", "A job's state", "200", "The job's state, progress and attempts."
                )
            },
            "/api/v1/jobs/{job_id}/events": {"get": events},
            "/api/v1/events": {"get": _caller_events_operation()},
            "/api/v1/models": {"get": _models_operation()},
            "/api/v1/jobs/{job_id}/cancel": {"post": cancel},
            "/api/v1/webhooks/secret": {"get": _webhook_secret_operation()},
            **_batch_operations(),
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
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
                    "security": [],
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
