"""The OpenAPI 3.1 document for the HTTP API, served at /v2/openapi.json."""

from __future__ import annotations

from typing import Any

from bastion import __version__
from bastion.config import OutputDetail


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERR = _ref("Error")
_ERRORS = {
    "400": _json(_ERR, "Malformed request"),
    "401": _json(_ERR, "Missing or invalid credentials"),
    "403": _json(_ERR, "Not permitted"),
    "404": _json(_ERR, "Unknown model"),
    "429": _json(_ERR, "Over a rate limit or quota (see Retry-After)"),
    "503": _json(_ERR, "Not ready, or the audit log is unavailable"),
}
_NAME = {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "model_version", "in": "path", "required": True, "schema": {"type": "string"}}
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]


def _model_paths(suffix: str, version: bool) -> dict[str, Any]:
    params = [_NAME, _VERSION] if version else [_NAME]
    if suffix == "/infer":
        return {
            "post": {
                "summary": "Run inference (Open Inference Protocol V2)",
                "operationId": "infer_versioned" if version else "infer",
                "security": _SECURED,
                "parameters": params,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("InferRequest")}},
                },
                "responses": {
                    "200": _json(_ref("InferResponse"), "Inference result"),
                    **_ERRORS,
                    "413": _json(_ERR, "Body or batch too large"),
                    "422": _json(_ERR, "Outside the model's declared inputs"),
                },
            }
        }
    if suffix == "/ready":
        return {
            "get": {
                "summary": "Model readiness",
                "operationId": "model_ready_versioned" if version else "model_ready",
                "security": _SECURED,
                "parameters": params,
                "responses": {"200": _json(_ref("ModelReady"), "Ready"), **_ERRORS},
            }
        }
    return {
        "get": {
            "summary": "Model metadata, with what this caller is granted",
            "operationId": "model_metadata_versioned" if version else "model_metadata",
            "security": _SECURED,
            "parameters": params,
            "responses": {"200": _json(_ref("ModelMetadata"), "Model metadata"), **_ERRORS},
        }
    }


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
    "paths": {
        "/v2/health/live": {
            "get": {
                "summary": "Liveness (no credentials)",
                "operationId": "live",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "Live")},
            }
        },
        "/v2/health/ready": {
            "get": {
                "summary": "Readiness (no credentials)",
                "operationId": "ready",
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "Ready"),
                    "503": _json({"type": "object"}, "Not ready"),
                },
            }
        },
        "/v2": {
            "get": {
                "summary": "Server metadata",
                "operationId": "server_metadata",
                "security": _SECURED,
                "responses": {"200": _json(_ref("ServerMetadata"), "Server metadata"), **_ERRORS},
            }
        },
        "/v2/models/{model_name}": _model_paths("", False),
        "/v2/models/{model_name}/versions/{model_version}": _model_paths("", True),
        "/v2/models/{model_name}/ready": _model_paths("/ready", False),
        "/v2/models/{model_name}/versions/{model_version}/ready": _model_paths("/ready", True),
        "/v2/models/{model_name}/infer": _model_paths("/infer", False),
        "/v2/models/{model_name}/versions/{model_version}/infer": _model_paths("/infer", True),
        "/v2/models/{model_name}/aggregate": {
            "post": {
                "summary": "Differentially private counts, sums and means of the predictions over a batch",
                "operationId": "aggregate",
                "security": _SECURED,
                "parameters": [_NAME],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("InferRequest")}},
                },
                "responses": {
                    "200": _json({"type": "object", "required": ["statistics"]}, "Noisy statistics"),
                    **_ERRORS,
                    "413": _json(_ERR, "Body or batch too large"),
                    "422": _json(_ERR, "Outside the model's declared inputs"),
                },
            }
        },
        "/v2/auth/token": {
            "post": {
                "summary": "Exchange an API key for a short-lived scoped token (EdDSA JWT)",
                "operationId": "issue_token",
                "security": _SECURED,
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("TokenRequest")}},
                },
                "responses": {"200": _json(_ref("TokenResponse"), "Token issued"), **_ERRORS},
            }
        },
        "/v2/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "security": _SECURED,
                "responses": {"200": _json({"type": "object"}, "OpenAPI document"), **_ERRORS},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (admin grant)",
                "operationId": "metrics",
                "security": _SECURED,
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_ERRORS,
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "API key or token"}
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
                "required": ["name", "shape", "datatype", "data"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "datatype": {"type": "string"},
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
            "TokenRequest": {
                "type": "object",
                "properties": {
                    "scope": {
                        "type": "array",
                        "items": {"type": "string", "examples": ["infer:breast-cancer"]},
                    },
                    "output": {"type": "string", "enum": [*(d.value for d in OutputDetail), "full"]},
                    "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": 86400},
                },
            },
            "TokenResponse": {
                "type": "object",
                "required": ["access_token", "token_type", "expires_in", "scope"],
                "properties": {
                    "access_token": {"type": "string"},
                    "token_type": {"type": "string"},
                    "expires_in": {"type": "integer"},
                    "scope": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
