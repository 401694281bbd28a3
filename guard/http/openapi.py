"""The proxy's OpenAPI 3.1 document, served at `GET /openapi.json`.

A pure function of the routes the app serves: each served (method, path) that is documented here
becomes an operation. Request and response bodies come from the pydantic models in
`guard.core.protocol` (and the trace from `guard.core.types`), so the document cannot drift from what the
proxy validates; every error is OpenAI's `{"error": {...}}` shape.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from importlib import metadata
from typing import Any

from pydantic.json_schema import models_json_schema

from guard.core.labels import MAX_NOTE, VERDICTS, Label
from guard.core.moderation import (
    GuardrailRequest,
    GuardrailResponse,
    ModerationRequest,
    ModerationResponse,
)
from guard.core.protocol import ImageEditRequest, ImageGenerationRequest, ImagesResponse
from guard.core.types import Trace

_REF = "#/components/schemas/{model}"
_NULLABLE_STRING = {"type": ["string", "null"]}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": _NULLABLE_STRING, "code": _NULLABLE_STRING,
                       "trace_id": {"type": "string",
                                    "description": "The trace of an images request."}}}},
}

_ERRORS = {
    400: "Invalid request, or a Host that is not trusted (code `untrusted_host`).",
    401: "No API key, or an unknown one.",
    403: "The key's role may not use this endpoint.",
    404: "Not found.",
    413: "The body is larger than the server's limit.",
    429: "The image backend is rate limiting (Retry-After).",
    500: "An internal error; or the image could not be given its C2PA manifest (code "
         "`provenance_failed`, under `provenance.on_error: refuse`): nothing was served.",
    501: "The configured part cannot do this (e.g. an audit store without a transparency log).",
    502: "The image backend failed.",
    503: "A judge or the audit store is unavailable; nothing was served (for the log: it "
         "signs no tree head, code `log_blocked`).",
    504: "The image backend timed out, or the request's deadline passed (policy "
         "`rounds.deadline_s`, header `x-guard-deadline-s`; code `guard_deadline_exceeded`).",
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _responses(ok: dict[str, Any], *errors: int, status: int = 200) -> dict[str, Any]:
    responses: dict[str, Any] = {str(status): ok}
    for status in errors:
        responses[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    responses["default"] = _json(_ref("Error"), "Any other error, in the same shape.")
    return responses


def _query(name: str, schema: dict[str, Any], description: str,
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema,
            "description": description}


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"},
            "description": description}


# One server-sent event (Open API 3.1 describes each event of a stream with `schema`); `data` is
# OpenAI's Image{Gen,Edit}CompletedEvent with the guard block, or an error in OpenAI's shape.
_EVENT = {"type": "object", "required": ["event", "data"], "properties": {
    "event": {"enum": ["image_generation.completed", "image_edit.completed", "error"]},
    "data": {"type": "string", "contentMediaType": "application/json"}}}
_IMAGES_OK = {
    "description": "The judged images (and the guard block); with `stream: true`, server-sent "
                   "events, one `*.completed` event per judged image.",
    "content": {"application/json": {"schema": _ref("ImagesResponse")},
                "text/event-stream": {"schema": _EVENT}},
    "headers": {"x-guard-trace-id": {"schema": {"type": "string"},
                                     "description": "The request's trace."}},
}
_IMAGES_ERRORS = (400, 401, 403, 413, 429, 500, 502, 503, 504)
_TEXT_FILTERS = ("decision", "category", "tenant", "key_id", "policy_id", "model")
_PUBLIC: list[dict[str, list[str]]] = []  # an operation without authentication

_STH = {"type": "object", "required": ["tree_size", "root_hash", "timestamp", "key_id",
                                      "signature"], "properties": {
    "tree_size": {"type": "integer"}, "root_hash": {"type": "string", "description": "base64"},
    "timestamp": {"type": "integer", "description": "milliseconds since the epoch"},
    "key_id": {"type": "string"}, "signature": {"type": "string", "description": "base64"}}}
_LOG_KEYS = {"type": "object", "required": ["log_id", "keys"], "properties": {
    "log_id": {"type": "string"}, "keys": {"type": "array", "items": {"type": "object"}}}}

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/images/generations"): {
        "operationId": "createImage", "tags": ["Images"],
        "summary": "Generate images; every image is judged against the caller's policy.",
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("ImageGenerationRequest")}}},
        "responses": _responses(_IMAGES_OK, *_IMAGES_ERRORS),
    },
    ("POST", "/v1/images/edits"): {
        "operationId": "createImageEdit", "tags": ["Images"],
        "summary": "Edit images; the inputs and every result are judged.",
        "requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": _ref("ImageEditForm"),
            "encoding": {"image": {"contentType": "image/png, image/jpeg, image/webp"},
                         "mask": {"contentType": "image/png"}}}}},
        "responses": _responses(_IMAGES_OK, *_IMAGES_ERRORS),
    },
    ("POST", "/v1/moderations"): {
        "operationId": "createModeration", "tags": ["Moderations"],
        "summary": "OpenAI's moderations, served by the guard's judge under the caller's "
                   "policy (categories under OpenAI's names, docs/gateways.md).",
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("ModerationRequest")}}},
        "responses": _responses(_json(_ref("ModerationResponse"), "One result per input."),
                                400, 401, 403, 413, 429, 503),
    },
    ("POST", "/beta/litellm_basic_guardrail_api"): {
        "operationId": "litellmGuardrail", "tags": ["Moderations"],
        "summary": "LiteLLM's Generic Guardrail API: the prescreen; the key as Authorization "
                   "or `x-api-key`.",
        "security": [{"bearer": []}, {"x-api-key": []}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("GuardrailRequest")}}},
        "responses": _responses(_json(_ref("GuardrailResponse"), "NONE, GUARDRAIL_INTERVENED "
                                      "(refined texts) or BLOCKED."),
                                400, 401, 403, 413, 429, 503),
    },
    ("GET", "/v1/guard/images/{image_id}"): {
        "operationId": "getServedImage", "tags": ["Guard"], "security": _PUBLIC,
        "summary": "An image from a `response_format: url` link (signed, expiring).",
        "parameters": [
            _path("image_id", "From the link."),
            _query("exp", {"type": "string", "pattern": "^[0-9]{1,12}$"},
                   "Expiry, Unix seconds (from the link).", True),
            _query("kid", {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,32}$"},
                   "The id of the key that signed the link (from the link).", False),
            _query("sig", {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                   "Signature (from the link).", True)],
        "responses": _responses(
            {"description": "The image.", "content": {
                t: {"schema": {"type": "string", "contentMediaType": t}}
                for t in ("image/png", "image/jpeg", "image/webp")}}, 400, 404),
    },
    ("GET", "/v1/guard/traces"): {
        "operationId": "listTraces", "tags": ["Audit"],
        "summary": "Traces, newest first (an auditor sees their own tenant only).",
        "parameters": [
            _query("since", {"type": "string"}, "Age (30m, 12h, 7d), ISO date/time or Unix s."),
            _query("until", {"type": "string"}, "As `since`."),
            *(_query(name, {"type": "string"}, f"Only traces with this {name}.")
              for name in _TEXT_FILTERS),
            _query("q", {"type": "string", "maxLength": 500}, "Words of the request's prompt "
                   "(1 to 16): each must begin a word of it, in any order and case."),
            _query("endpoint", {"enum": ["generations", "edits", "/v1/images/generations",
                                         "/v1/images/edits"]}, "Only traces of this endpoint."),
            _query("policy", {"type": "string"}, "Only traces with this policy id (or "
                   "`policy_id`, not both)."),
            _query("policy_version", {"type": "integer", "minimum": 0,
                                      "maximum": 2**31 - 1}, "Only this policy version."),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                   "Page size."),
            _query("cursor", {"type": "string"}, "`next_cursor` of the previous page.")],
        "responses": _responses(_json(_ref("TraceList"), "One page of traces."), 400, 401, 403),
    },
    ("GET", "/v1/guard/traces/{trace_id}"): {
        "operationId": "getTrace", "tags": ["Audit"], "summary": "One trace, every round.",
        "parameters": [_path("trace_id", "`x-guard-trace-id` of an images response.")],
        "responses": _responses(_json(_ref("Trace"), "The trace."), 401, 403, 404),
    },
    ("POST", "/v1/guard/traces/{trace_id}/labels"): {
        "operationId": "createLabel", "tags": ["Audit"],
        "summary": "Label a judged image (slot, round) or the prompt (slot null, round 0) of a "
                   "trace; append-only: a later label of the same item supersedes this one.",
        "parameters": [_path("trace_id", "The trace.")],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("LabelRequest")}}},
        "responses": _responses(_json(_ref("Label"), "The label, as stored."),
                                400, 401, 403, 404, 413, status=201),
    },
    ("GET", "/v1/guard/labels"): {
        "operationId": "listLabels", "tags": ["Audit"],
        "summary": "Labels, newest first; each item's latest only unless `all` (an auditor "
                   "sees their own tenant only).",
        "parameters": [
            _query("trace_id", {"type": "string"}, "Only this trace's labels."),
            _query("verdict", {"enum": list(VERDICTS)}, "Only labels with this verdict."),
            _query("category", {"type": "string"}, "Only labels naming this category."),
            _query("tenant", {"type": "string"}, "Only this tenant's (admins)."),
            _query("since", {"type": "string"}, "Labelled since: as for traces."),
            _query("until", {"type": "string"}, "As `since`."),
            _query("all", {"type": "boolean", "default": False},
                   "Superseded labels too (marked `superseded`)."),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                   "Page size."),
            _query("cursor", {"type": "string"}, "`next_cursor` of the previous page.")],
        "responses": _responses(_json(_ref("LabelList"), "One page of labels."), 400, 401, 403),
    },
    ("GET", "/v1/guard/policies/history"): {
        "operationId": "policyHistory", "tags": ["Audit"],
        "summary": "Every policy version served (its sha256, effective content kept in the "
                   "audit store), each start and reload, and with `a` and `b` the differences "
                   "between two versions.",
        "parameters": [
            _query("policy", {"type": "string"}, "Only this policy id."),
            _query("a", {"type": "string"}, "sha256 of a version to compare (with `b`)."),
            _query("b", {"type": "string"}, "sha256 of the version to compare it with."),
        ],
        "responses": _responses(_json({"type": "object", "required": ["object", "data",
                                                                      "events"]},
                                      "The history."), 400, 401, 403, 404),
    },
    ("GET", "/v1/guard/log/keys"): {
        "operationId": "logKeys", "tags": ["Transparency log"],
        "summary": "The log's Ed25519 public keys (the signing key first) and its log id; "
                   "open to anyone with `audit.public_log: true`, else auditors.",
        "responses": _responses(_json(_LOG_KEYS, "The keys."), 401, 403, 501),
    },
    ("GET", "/v1/guard/log/sth"): {
        "operationId": "logTreeHead", "tags": ["Transparency log"],
        "summary": "The newest signed tree head (RFC 9162), signing one first when rows wait.",
        "responses": _responses(_json(_STH, "The signed tree head."), 401, 403, 501, 503),
    },
    ("GET", "/v1/guard/log/proof/inclusion"): {
        "operationId": "logInclusionProof", "tags": ["Transparency log"],
        "summary": "A trace's (or label's) leaf, its index and audit path under a signed head.",
        "parameters": [_query("trace_id", {"type": "string"}, "The trace (or give label_id)."),
                       _query("label_id", {"type": "string"}, "The label (or give trace_id).")],
        "responses": _responses(_json({"type": "object", "required": [
            "leaf_index", "tree_size", "leaf", "leaf_hash", "audit_path", "sth"], "properties": {
            "leaf_index": {"type": "integer"}, "tree_size": {"type": "integer"},
            "leaf": {"type": "object"}, "leaf_hash": {"type": "string"},
            "audit_path": {"type": "array", "items": {"type": "string"}}, "sth": _STH}},
            "The inclusion proof."), 400, 401, 403, 404, 501, 503),
    },
    ("GET", "/v1/guard/log/proof/consistency"): {
        "operationId": "logConsistencyProof", "tags": ["Transparency log"],
        "summary": "The consistency proof between two tree sizes (1 <= first <= second <= the "
                   "newest head's).",
        "parameters": [_query("first", {"type": "integer", "minimum": 1}, "The older size.",
                              required=True),
                       _query("second", {"type": "integer", "minimum": 1}, "The newer size.",
                              required=True)],
        "responses": _responses(_json({"type": "object", "required": [
            "first", "second", "proof", "sth"], "properties": {
            "first": {"type": "integer"}, "second": {"type": "integer"},
            "proof": {"type": "array", "items": {"type": "string"}}, "sth": _STH}},
            "The consistency proof."), 400, 401, 403, 501, 503),
    },
    ("POST", "/v1/guard/policies/reload"): {
        "operationId": "reloadPolicies", "tags": ["Operations"],
        "summary": "Re-read the policy files now (admin); invalid files keep the running ones.",
        "responses": _responses(_json(_ref("PolicyReload"), "What changed."), 400, 401, 403),
    },
    ("GET", "/healthz"): {
        "operationId": "health", "tags": ["Operations"], "security": _PUBLIC,
        "summary": "Liveness (answers whatever the Host, for probes by pod IP).",
        "responses": {"200": _json({"type": "object", "required": ["status"], "properties": {
            "status": {"const": "ok"}}}, "Alive.")},
    },
    ("GET", "/readyz"): {
        "operationId": "ready", "tags": ["Operations"], "security": _PUBLIC,
        "summary": "Readiness of every part (judge models load in the background).",
        "responses": {str(status): _json(_ref("Readiness"), description)
                      for status, description in ((200, "Ready."), (503, "Not ready yet."))},
    },
    ("GET", "/metrics"): {
        "operationId": "metrics", "tags": ["Operations"], "security": _PUBLIC,
        "summary": "Prometheus metrics.",
        "responses": _responses({"description": "Prometheus text format.", "content": {
            "text/plain": {"schema": {"type": "string"}}}}, 400),
    },
    ("GET", "/openapi.json"): {
        "operationId": "openapi", "tags": ["Operations"], "security": _PUBLIC,
        "summary": "This document.",
        "responses": _responses(_json({"type": "object"}, "OpenAPI 3.1."), 400),
    },
}


def openapi_document(served: Iterable[tuple[str, str]], *,
                     public_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document for the served (method, path) pairs that are API operations
    (the review pages are HTML for people, and not among them)."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path in served:
        operation = OPERATIONS.get((method.upper(), path))
        if operation is not None:
            paths.setdefault(path, {})[method.lower()] = copy.deepcopy(operation)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "SafeEdit Guard", "version": _version(),
                 "description": "OpenAI's images API, with every image judged against a "
                                "policy, and the guard's own audit and operations endpoints."},
        "paths": paths,
        "components": _components(),
        "security": [{"bearer": []}],
    }
    if public_url:
        document["servers"] = [{"url": public_url.rstrip("/")}]
    return document


def _components() -> dict[str, Any]:
    _, defs = models_json_schema(
        [(ImageGenerationRequest, "validation"), (ImageEditRequest, "validation"),
         (ImagesResponse, "serialization"), (Trace, "serialization"),
         (Label, "serialization"), (ModerationRequest, "validation"),
         (ModerationResponse, "serialization"), (GuardrailRequest, "validation"),
         (GuardrailResponse, "serialization")], ref_template=_REF)
    schemas: dict[str, Any] = defs["$defs"]
    schemas["Label"]["properties"].update({
        "object": {"const": "guard.label"},
        "superseded": {"type": "boolean", "description": "A later label of the same item "
                                                        "replaced this one."}})
    index = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
    form = copy.deepcopy(schemas["ImageEditRequest"])
    binary = {"type": "string", "contentMediaType": "application/octet-stream"}
    form["properties"] = {"image": {"type": "array", "items": binary, "minItems": 1,
                                    "maxItems": 16, "description": "1 to 16 images."},
                          "mask": {**binary, "description": "PNG; transparent where to edit."},
                          **form["properties"]}
    form["required"] = ["image", *form.get("required", [])]
    form["description"] = ("The edit's fields as multipart/form-data; text fields are strings "
                           "on the wire (`image[]` is accepted for `image`).")
    schemas.update({
        "ImageEditForm": form,
        "Error": ERROR_SCHEMA,
        "TraceList": {"type": "object", "required": ["object", "data", "next_cursor"],
                      "properties": {"object": {"const": "list"},
                                     "data": {"type": "array", "items": {"type": "object"}},
                                     "next_cursor": _NULLABLE_STRING}},
        "LabelRequest": {
            "type": "object", "required": ["round", "verdict"], "additionalProperties": False,
            "properties": {
                "slot": {**index, "type": ["integer", "null"],
                         "description": "The image slot; null (or absent): the prompt."},
                "round": {**index, "description": "The round it was judged in (prompt: 0)."},
                "verdict": {"enum": list(VERDICTS)},
                "category": {**_NULLABLE_STRING, "description": "A category of the trace's "
                             "policy; required when the verdict is `missed`."},
                "note": {"type": "string", "maxLength": MAX_NOTE}}},
        "LabelList": {"type": "object", "required": ["object", "data", "next_cursor"],
                      "properties": {"object": {"const": "list"},
                                     "data": {"type": "array", "items": _ref("Label")},
                                     "next_cursor": _NULLABLE_STRING}},
        "PolicyReload": {"type": "object", "required": ["object", "changed", "policies"],
                         "properties": {"object": {"const": "guard.policy_reload"},
                                        "changed": {"type": "array"},
                                        "policies": {"type": "array"},
                                        "warnings": {"type": "array",
                                                     "items": {"type": "string"}},
                                        "stale": {"type": "array", "description":
                                                  "Files changed under a version already "
                                                  "served: the running content is kept."}}},
        "Readiness": {"type": "object", "required": ["status", "checks"],
                      "properties": {"status": {"enum": ["ready", "not ready"]},
                                     "checks": {"type": "object",
                                                "additionalProperties": {"type": "boolean"}},
                                     "details": {"type": "object", "properties": {
                                         "stale_policies": {"type": "array", "description":
                                             "Policy files changed under a version already "
                                             "served; that version's content is served "
                                             "until the file's version is raised."}}}}},
    })
    return {
        "schemas": schemas,
        "responses": {f"Error{status}": _json(_ref("Error"), description)
                      for status, description in _ERRORS.items()},
        "securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "An API key from the config's `keys` (any key in open mode)."},
            "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key",
                          "description": "The same key, as LiteLLM sends a guardrail's "
                                         "(the guardrail endpoint only)."}},
    }


def _version() -> str:
    try:
        return metadata.version("safeedit-guard")
    except metadata.PackageNotFoundError:
        return "0+unknown"
