"""The OpenAPI 3.1 document for the HTTP API, served at /v2/openapi.json.

Its paths are generated from the route table (`bastion.routes.ROUTES`), the same table that
routes requests, so a served route cannot be missing from the document.
"""

from __future__ import annotations

import re
from typing import Any

from bastion import __version__
from bastion.config import Action, OutputDetail
from bastion.routes import ROUTES, RouteSpec


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERR = _ref("Error")
_NAME = {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "model_version", "in": "path", "required": True, "schema": {"type": "string"}}
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]
_SECURED_OR_SESSION: list[dict[str, list[str]]] = [{"bearer": []}, {"session": []}]
_ERROR_TEXT = {
    400: "Malformed request",
    401: "Missing or invalid credentials",
    403: "Not permitted",
    404: "Unknown model",
    429: "Over a rate limit or quota (see Retry-After)",
    503: "Not ready, or the audit log is unavailable",
    502: "The language model's upstream failed",
    504: "The language model's upstream did not answer in time",
}


_FILES = {  # the dashboard's page and files: (media type, description)
    "html": ("text/html", "An HTML page"),
    "javascript": ("text/javascript", "The dashboard's script"),
    "css": ("text/css", "The dashboard's style sheet"),
}


def _response_schema(name: str) -> dict[str, Any]:
    if name == "text":
        return {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    if name in _FILES:
        media, description = _FILES[name]
        return {"description": description, "content": {media: {"schema": {"type": "string"}}}}
    return _json({"type": "object"} if name == "object" else _ref(name), "Success")


_BINARY_HEADER = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "description": "Binary tensor extension: the length of the JSON InferRequest at the start of the body",
    "schema": {"type": "integer", "minimum": 0},
}


def _operation(spec: RouteSpec, versioned: bool) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": spec.summary,
        "operationId": f"{spec.route.value}_versioned" if versioned else spec.route.value,
        "security": [] if spec.public else _SECURED_OR_SESSION if spec.session else _SECURED,
    }
    if "{model_name}" in spec.path:
        op["parameters"] = [_NAME, _VERSION] if versioned else [_NAME]
    for name, pattern in (
        ("incident_id", "^[1-9][0-9]{0,11}$"),
        ("key_id", "^([0-9a-f]{16}|cert:[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$"),
        ("jti", "^[A-Za-z0-9_-]{16}$"),
    ):
        if "{" + name + "}" in spec.path:
            op["parameters"] = [
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": pattern},
                }
            ]
    if spec.request is not None:
        op["requestBody"] = {
            "required": spec.request_required,
            "content": {"application/json": {"schema": _ref(spec.request)}},
        }
    if spec.request == "InferRequest":  # the binary tensor extension: JSON header, then raw tensors
        op["requestBody"]["content"]["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
        op["parameters"] = [*op.get("parameters", []), _BINARY_HEADER]
    responses: dict[str, Any] = {"200": _response_schema(spec.response)}
    if spec.response == "InferResponse":  # the binary tensor extension's answer
        responses["200"]["content"]["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"}
        }
    error = _ref("OpenAIError") if spec.openai else _ERR
    for status in spec.errors:
        schema = error if not spec.public else {"type": "object"}
        responses[str(status)] = _json(schema, _ERROR_TEXT[status])
    if spec.request is not None:  # every route that reads a body refuses one over its cap
        responses["413"] = _json(error, "Body too large")
    for status, text in spec.extra_responses.items():
        responses[str(status)] = _json(error, text)
    op["responses"] = responses
    return op


def _paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for spec in ROUTES:
        for path, versioned in spec.paths():
            op = _operation(spec, versioned)
            if any(op["operationId"] == o["operationId"] for ops in paths.values() for o in ops.values()):
                # One route, several fixed paths (the dashboard's files): the path names each.
                op["operationId"] += "_" + re.sub(r"[^a-z0-9]+", "_", path.rsplit("/", 1)[-1])
            paths.setdefault(path, {})[spec.method.lower()] = op
    return paths


_TENSOR_META = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "parameters": {"type": "object"},
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Bastion",
        "version": __version__,
        "description": "Open Inference Protocol V2 REST API with authentication, input guard, rate limits, "
        "output policy and a tamper-evident audit log in the request path.",
    },
    "paths": _paths(),
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "API key or token"},
            "session": {
                "type": "apiKey",
                "in": "cookie",
                "name": "bastion_session",
                "description": "A dashboard session (POST /v2/admin/session; `__Host-bastion_session` "
                "over TLS); state-changing requests also send its CSRF token as X-CSRF-Token",
            },
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "code"],
                "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
            },
            "ServerMetadata": {
                "type": "object",
                "required": ["name", "version", "extensions"],
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "extensions": {"type": "array", "items": {"type": "string"}},
                },
            },
            "ModelReady": {
                "type": "object",
                "required": ["name", "ready"],
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "ready": {"type": "boolean"},
                },
            },
            "ModelMetadata": {
                "type": "object",
                "required": ["name", "platform", "inputs", "outputs"],
                "properties": {
                    "name": {"type": "string"},
                    "versions": {"type": "array", "items": {"type": "string"}},
                    "platform": {"type": "string"},
                    "inputs": {"type": "array", "items": _TENSOR_META},
                    "outputs": {"type": "array", "items": _TENSOR_META},
                    "parameters": {"type": "object"},
                },
            },
            "RequestInput": {
                "type": "object",
                "required": ["name", "shape", "datatype", "data"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "datatype": {"type": "string"},
                    "parameters": {"type": "object"},
                    "data": {"type": "array"},
                },
            },
            "RequestOutput": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
            "InferRequest": {
                "type": "object",
                "description": (
                    "A V2 inference request. Binary tensor extension (Triton's binary_tensor_data): "
                    "send this document as the first Inference-Header-Content-Length bytes of the "
                    "body, an input's raw little-endian bytes after it in input order, each such "
                    "input with parameters.binary_data_size and no data. Outputs with "
                    "parameters.binary_data true (or parameters.binary_data_output true for all) "
                    "come back the same way, as application/octet-stream with that header."
                ),
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": _ref("RequestInput")},
                    "outputs": {"type": "array", "items": _ref("RequestOutput")},
                },
            },
            "ResponseOutput": {
                "type": "object",
                "description": "data, or parameters.binary_data_size when sent as raw bytes",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "datatype": {"type": "string"},
                    "parameters": {"type": "object"},
                    "data": {"type": "array"},
                },
            },
            "InferResponse": {
                "type": "object",
                "required": ["model_name", "outputs"],
                "properties": {
                    "model_name": {"type": "string"},
                    "model_version": {"type": "string"},
                    "id": {"type": "string"},
                    "outputs": {"type": "array", "items": _ref("ResponseOutput")},
                },
            },
            "AggregateResponse": {
                "type": "object",
                "required": ["model_name", "statistics"],
                "properties": {
                    "model_name": {"type": "string"},
                    "model_version": {"type": "string"},
                    "rows": {"type": "integer"},
                    "statistics": {"type": "object"},
                },
            },
            "TokenRequest": {
                "type": "object",
                # What IssueToken accepts: no other field, a non-empty scope of "action:model" pairs.
                "additionalProperties": False,
                "properties": {
                    "scope": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "string",
                            "pattern": f"^({'|'.join(a.value for a in Action)}):.",
                            "examples": ["infer:breast-cancer"],
                        },
                    },
                    "output": {"type": "string", "enum": [*(d.value for d in OutputDetail), "full"]},
                    "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": 86400},
                },
            },
            "OpenAIError": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["message", "type", "code"],
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": "string"},
                        },
                    }
                },
            },
            "ChatModel": {
                "type": "object",
                "required": ["id", "object", "created", "owned_by"],
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                },
            },
            "ModelList": {
                "type": "object",
                "required": ["object", "data"],
                "properties": {
                    "object": {"const": "list"},
                    "data": {"type": "array", "items": _ref("ChatModel")},
                },
            },
            # What bastion.llm.protocol.decode_chat_request accepts, exactly (the fuzzer checks both ways).
            "ChatCompletionRequest": {
                "type": "object",
                "description": "OpenAI's chat completion request; parameters not listed are refused by name.",
                "additionalProperties": False,
                "required": ["model", "messages"],
                "properties": {
                    "model": {"type": "string", "minLength": 1, "maxLength": 64},
                    "messages": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["role", "content"],
                            "properties": {
                                "role": {"enum": ["system", "developer", "user", "assistant"]},
                                "content": {
                                    "oneOf": [
                                        {"type": "string"},
                                        {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "additionalProperties": False,
                                                "required": ["type", "text"],
                                                "properties": {
                                                    "type": {"const": "text"},
                                                    "text": {"type": "string"},
                                                },
                                            },
                                        },
                                    ]
                                },
                                "name": {"type": ["string", "null"], "maxLength": 64},
                            },
                        },
                    },
                    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
                    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
                    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
                    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
                    "stop": {
                        "oneOf": [
                            {"type": "string", "minLength": 1},
                            {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}},
                            {"type": "null"},
                        ]
                    },
                    "stream": {"type": ["boolean", "null"]},
                    "stream_options": {
                        "type": ["object", "null"],
                        "additionalProperties": False,
                        "properties": {"include_usage": {"type": "boolean"}},
                    },
                    "seed": {"type": ["integer", "null"], "minimum": -(2**63), "maximum": 2**63 - 1},
                    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},
                    "user": {"type": ["string", "null"], "maxLength": 256},
                },
                # One of the two names for the completion cap; stream_options only on a stream.
                "not": {"required": ["max_tokens", "max_completion_tokens"]},
                "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
                "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
            },
            "ChatCompletion": {
                "type": "object",
                "required": ["id", "object", "created", "model", "choices", "usage"],
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "chat.completion"},
                    "created": {"type": "integer"},
                    "model": {"type": "string"},
                    "choices": {"type": "array"},
                    "usage": {"type": "object"},
                },
            },
            "Incident": {
                "type": "object",
                "required": ["id", "state", "kind", "model", "action", "evidence", "events"],
                "properties": {
                    "id": {"type": "integer"},
                    "state": {"enum": ["open", "contained", "investigating", "remediated", "closed"]},
                    "kind": {"type": "string"},
                    "model": {"type": "string"},
                    "principal": {"type": ["string", "null"]},
                    "action": {"type": "string"},
                    "detail": {"type": "string"},
                    "evidence": {"type": "object"},
                    "request_id": {"type": ["string", "null"]},
                    "opened_at": {"type": "number"},
                    "updated_at": {"type": "number"},
                    "events": {"type": "array", "items": {"type": "object"}},
                },
            },
            "IncidentList": {
                "type": "object",
                "required": ["incidents", "counts"],
                "properties": {
                    "incidents": {"type": "array", "items": _ref("Incident")},
                    "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                },
            },
            "IncidentTransition": {
                "type": "object",
                "additionalProperties": False,
                "required": ["state"],
                "properties": {
                    "state": {"enum": ["open", "contained", "investigating", "remediated", "closed"]},
                    "note": {"type": "string", "maxLength": 2000},
                },
            },
            "IncidentNote": {
                "type": "object",
                "additionalProperties": False,
                "required": ["note"],
                "properties": {
                    "note": {"type": "string", "minLength": 1, "maxLength": 2000, "pattern": "\\S"}
                },
            },
            "Empty": {"type": "object", "additionalProperties": False, "properties": {}},
            "RevokeTokens": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "before": {
                        "type": "number",
                        "minimum": 0,
                        "maximum": 1e12,
                        "description": "Unix seconds (default, and at most: now)",
                    }
                },
            },
            "Session": {
                "type": "object",
                "required": ["key_id", "csrf_token", "expires_in", "expires_at"],
                "properties": {
                    "key_id": {"type": "string"},
                    "csrf_token": {"type": "string"},
                    "expires_in": {"type": "integer"},
                    "expires_at": {"type": "number"},
                },
            },
            "Summary": {
                "type": "object",
                "required": [
                    "generated_at",
                    "traffic",
                    "denials",
                    "latency",
                    "roles",
                    "incidents",
                    "quarantined_keys",
                    "models",
                    "drift",
                    "llm",
                ],
                "properties": {
                    "generated_at": {"type": "number"},
                    "traffic": {"type": "object"},
                    "denials": {"type": "object"},
                    "latency": {"type": "object"},
                    "roles": {"type": "array", "items": {"type": "object"}},
                    "incidents": {"type": "object"},
                    "quarantined_keys": {"type": "array", "items": {"type": "object"}},
                    "models": {"type": "object"},
                    "drift": {"type": "object"},
                    "llm": {"type": "object"},
                },
            },
            "TokenResponse": {
                "type": "object",
                "required": ["access_token", "token_type", "expires_in", "expires_at", "jti", "scope"],
                "properties": {
                    "access_token": {"type": "string"},
                    "token_type": {"type": "string"},
                    "expires_in": {"type": "integer"},
                    "expires_at": {"type": "integer", "description": "Unix seconds"},
                    "jti": {
                        "type": "string",
                        "description": "The token's id: what an admin revokes it by (POST "
                        "/v2/admin/tokens/{jti}/revoke, bastion tokens revoke); in the audit log as `token`",
                    },
                    "scope": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
