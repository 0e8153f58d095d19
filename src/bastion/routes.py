"""The route table: every route the server answers, written once.

HTTP routing (`bastion.http.app`), the OpenAPI document (`bastion.http.openapi`) and the
README's route list (checked by `tests/unit/test_routes.py`) all come from `ROUTES`, so
they cannot drift apart. Each row says which pipeline answers (`Route`), the action it
needs, and what it documents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from bastion.config import Action


class Route(StrEnum):
    """A pipeline of the service (see `Bastion.build_pipelines`)."""

    INFER = "infer"
    MODEL_METADATA = "model_metadata"
    MODEL_READY = "model_ready"
    SERVER_METADATA = "server_metadata"
    TOKEN = "token"  # noqa: S105 (a route name, not a secret)
    METRICS = "metrics"
    OPENAPI = "openapi"
    AGGREGATE = "aggregate"
    CHAT = "chat"  # OpenAI-compatible chat completions
    CHAT_MODELS = "chat_models"  # OpenAI-compatible model list
    CHAT_MODEL = "chat_model"  # OpenAI-compatible model retrieval
    INCIDENTS = "incidents"  # admin: the incident list
    INCIDENT = "incident"  # admin: one incident, with its timeline
    INCIDENT_TRANSITION = "incident_transition"  # admin: move an incident along its lifecycle
    INCIDENT_NOTE = "incident_note"  # admin: add a note
    KEY_RELEASE = "key_release"  # admin: release a quarantined key
    MODEL_RELEASE = "model_release"  # admin: release an isolated model
    TOKEN_REVOKE = "token_revoke"  # noqa: S105 (admin: put one token on the deny list by its jti)
    KEY_TOKENS_REVOKE = "key_tokens_revoke"  # admin: revoke a key's tokens issued before a time
    SESSION = "session"  # admin: open a dashboard session (an API key in, an HttpOnly cookie out)
    SESSION_LOGOUT = "session_logout"  # admin: end it
    SUMMARY = "summary"  # admin: what the dashboard shows, as JSON
    DASHBOARD = "dashboard"  # admin: the dashboard page
    DASHBOARD_ASSET = "dashboard_asset"  # anyone: the login page, the script and the style sheet
    LIVE = "live"
    READY = "ready"
    NOT_FOUND = "not_found"
    WRONG_METHOD = "wrong_method"


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One row of the route table.

    `path` is an OpenAPI path template; `{model_name}` and `{model_version}` are its only
    parameters. A spec with `versioned=True` is served, and documented, both as `path` and
    with `/versions/{model_version}` after the model name.
    """

    route: Route
    method: str
    path: str
    action: Action
    summary: str
    response: str  # a component schema name, or "text" (Prometheus) / "object"
    request: str | None = None  # a component schema name for the JSON body
    request_required: bool = True
    versioned: bool = False
    public: bool = False  # answers without credentials (orchestrator probes, the dashboard's files)
    session: bool = False  # also accepts a dashboard session's cookie (bastion.sessions)
    errors: tuple[int, ...] = (400, 401, 403, 404, 429, 503)
    extra_responses: dict[int, str] = field(default_factory=dict)
    # The shape of its errors: V2's `{"error", "code"}`, or OpenAI's `{"error": {...}}` on /v1.
    openai: bool = False

    def paths(self) -> list[tuple[str, bool]]:
        """(path template, has a version) for each path this spec serves."""
        out = [(self.path, False)]
        if self.versioned:
            out.append((self.path.replace("{model_name}", "{model_name}/versions/{model_version}"), True))
        return out


_MODEL_ERRORS = {
    413: "Body or batch too large",
    422: "Outside the model's declared inputs",
    500: "The model failed (inference_failed)",
    503: "Not ready, the audit log is unavailable, or the model's circuit breaker is open "
    "(model_circuit_open, see Retry-After)",
    504: "The model did not answer within its inference_timeout_seconds (inference_timeout)",
}

ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        Route.LIVE,
        "GET",
        "/v2/health/live",
        Action.METADATA,
        "Liveness (no credentials)",
        "object",
        public=True,
        errors=(),
    ),
    RouteSpec(
        Route.READY,
        "GET",
        "/v2/health/ready",
        Action.METADATA,
        "Readiness (no credentials)",
        "object",
        public=True,
        errors=(503,),
    ),
    RouteSpec(Route.SERVER_METADATA, "GET", "/v2", Action.METADATA, "Server metadata", "ServerMetadata"),
    RouteSpec(
        Route.MODEL_METADATA,
        "GET",
        "/v2/models/{model_name}",
        Action.METADATA,
        "Model metadata, with what this caller is granted",
        "ModelMetadata",
        versioned=True,
    ),
    RouteSpec(
        Route.MODEL_READY,
        "GET",
        "/v2/models/{model_name}/ready",
        Action.METADATA,
        "Model readiness",
        "ModelReady",
        versioned=True,
        extra_responses={503: "The model's circuit breaker is open (model_circuit_open, see Retry-After)"},
    ),
    RouteSpec(
        Route.INFER,
        "POST",
        "/v2/models/{model_name}/infer",
        Action.INFER,
        "Run inference (Open Inference Protocol V2)",
        "InferResponse",
        request="InferRequest",
        versioned=True,
        extra_responses=_MODEL_ERRORS,
    ),
    RouteSpec(
        Route.AGGREGATE,
        "POST",
        "/v2/models/{model_name}/aggregate",
        Action.AGGREGATE,
        "Differentially private counts, sums and means of the predictions over a batch",
        "AggregateResponse",
        request="InferRequest",
        versioned=True,
        extra_responses=_MODEL_ERRORS,
    ),
    RouteSpec(
        Route.TOKEN,
        "POST",
        "/v2/auth/token",
        Action.METADATA,
        "Exchange an API key for a short-lived scoped token (EdDSA JWT)",
        "TokenResponse",
        request="TokenRequest",
        request_required=False,
    ),
    RouteSpec(
        Route.CHAT_MODELS,
        "GET",
        "/v1/models",
        Action.METADATA,
        "The language models this caller may chat with (OpenAI-compatible)",
        "ModelList",
        openai=True,
    ),
    RouteSpec(
        Route.CHAT_MODEL,
        "GET",
        "/v1/models/{model_name}",
        Action.METADATA,
        "One language model, if this caller may chat with it (OpenAI-compatible)",
        "ChatModel",
        openai=True,
    ),
    RouteSpec(
        Route.CHAT,
        "POST",
        "/v1/chat/completions",
        Action.CHAT,
        "Chat completion behind a protected system prompt and the leakage guard (OpenAI-compatible; "
        "stream: true answers server-sent events ending in data: [DONE])",
        "ChatCompletion",
        request="ChatCompletionRequest",
        openai=True,
        errors=(400, 401, 403, 404, 429, 502, 503, 504),
    ),
    RouteSpec(
        Route.INCIDENTS,
        "GET",
        "/v2/admin/incidents",
        Action.ADMIN,
        "Incidents, newest first (admin grant)",
        "IncidentList",
        session=True,
    ),
    RouteSpec(
        Route.INCIDENT,
        "GET",
        "/v2/admin/incidents/{incident_id}",
        Action.ADMIN,
        "One incident with its timeline (admin grant)",
        "Incident",
        session=True,
    ),
    RouteSpec(
        Route.INCIDENT_TRANSITION,
        "POST",
        "/v2/admin/incidents/{incident_id}/transition",
        Action.ADMIN,
        "Move an incident along open -> contained -> investigating -> remediated -> closed (audited)",
        "Incident",
        request="IncidentTransition",
        session=True,
    ),
    RouteSpec(
        Route.INCIDENT_NOTE,
        "POST",
        "/v2/admin/incidents/{incident_id}/notes",
        Action.ADMIN,
        "Add a note to an incident's timeline (audited)",
        "Incident",
        request="IncidentNote",
        session=True,
    ),
    RouteSpec(
        Route.KEY_RELEASE,
        "POST",
        "/v2/admin/keys/{key_id}/release",
        Action.ADMIN,
        "Release a key quarantined by query auditing (audited)",
        "object",
        request_required=False,
        request="Empty",
        session=True,
    ),
    RouteSpec(
        Route.MODEL_RELEASE,
        "POST",
        "/v2/admin/models/{model_name}/release",
        Action.ADMIN,
        "Release a model isolated by query auditing (audited)",
        "object",
        request_required=False,
        request="Empty",
        session=True,
    ),
    RouteSpec(
        Route.TOKEN_REVOKE,
        "POST",
        "/v2/admin/tokens/{jti}/revoke",
        Action.ADMIN,
        "Revoke one token by its jti (the token response's jti): refused by every replica within a "
        "second (audited)",
        "object",
        request_required=False,
        request="Empty",
        session=True,
    ),
    RouteSpec(
        Route.KEY_TOKENS_REVOKE,
        "POST",
        "/v2/admin/keys/{key_id}/revoke-tokens",
        Action.ADMIN,
        "Revoke every token of a key issued before a time (body {\"before\": Unix seconds}, default "
        "now); the key and its later tokens still work (audited)",
        "object",
        request_required=False,
        request="RevokeTokens",
        session=True,
    ),
    RouteSpec(
        Route.SESSION,
        "POST",
        "/v2/admin/session",
        Action.ADMIN,
        "Open a dashboard session with an admin API key: an HttpOnly SameSite=Strict cookie, and the "
        "CSRF token its state-changing requests must send as X-CSRF-Token (audited)",
        "Session",
        request_required=False,
        request="Empty",
    ),
    RouteSpec(
        Route.SESSION_LOGOUT,
        "POST",
        "/v2/admin/session/logout",
        Action.ADMIN,
        "End this dashboard session and clear its cookie (audited)",
        "object",
        request_required=False,
        request="Empty",
        session=True,
    ),
    RouteSpec(
        Route.SUMMARY,
        "GET",
        "/v2/admin/summary",
        Action.ADMIN,
        "What the dashboard shows: traffic, denials, latency, limits, incidents, quarantined keys, "
        "models and rollouts, drift, language-model guard (admin grant)",
        "Summary",
        session=True,
    ),
    RouteSpec(
        Route.DASHBOARD,
        "GET",
        "/dashboard",
        Action.ADMIN,
        "The operators' dashboard page (admin grant; a session or a key)",
        "html",
        session=True,
    ),
    RouteSpec(
        Route.DASHBOARD_ASSET,
        "GET",
        "/dashboard/login",
        Action.METADATA,
        "The dashboard's login page (no credentials: a fixed file, no data)",
        "html",
        public=True,
        errors=(),
    ),
    RouteSpec(
        Route.DASHBOARD_ASSET,
        "GET",
        "/dashboard/app.js",
        Action.METADATA,
        "The dashboard's script (no credentials: a fixed file, no data)",
        "javascript",
        public=True,
        errors=(),
    ),
    RouteSpec(
        Route.DASHBOARD_ASSET,
        "GET",
        "/dashboard/app.css",
        Action.METADATA,
        "The dashboard's style sheet (no credentials: a fixed file, no data)",
        "css",
        public=True,
        errors=(),
    ),
    RouteSpec(Route.OPENAPI, "GET", "/v2/openapi.json", Action.METADATA, "This document", "object"),
    RouteSpec(Route.METRICS, "GET", "/metrics", Action.ADMIN, "Prometheus metrics (admin grant)", "text"),
)

# Unmatched paths and wrong methods still run a pipeline (401 before 404/405).
ROUTE_ACTIONS: dict[Route, Action] = {
    **{spec.route: spec.action for spec in ROUTES},
    Route.NOT_FOUND: Action.METADATA,
    Route.WRONG_METHOD: Action.METADATA,
}

_PARAMETER_PATTERNS = {
    "model_name": r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})",
    "model_version": r"(?P<version>[A-Za-z0-9][A-Za-z0-9_.-]{0,31})",
    "incident_id": r"(?P<resource>[1-9][0-9]{0,11})",
    # An API key's id, or a service identity's principal (mTLS): released like a key.
    "key_id": r"(?P<resource>[0-9a-f]{16}|cert:[A-Za-z0-9][A-Za-z0-9_.-]{0,63})",
    "jti": r"(?P<resource>[A-Za-z0-9_-]{16})",  # as bastion.tokens issues them
}


@dataclass(frozen=True, slots=True)
class Match:
    spec: RouteSpec
    model_name: str | None
    model_version: str | None
    method_allowed: bool
    resource_id: str | None = None  # an incident's, a key's or a token's (jti) id in the path


class Router:
    """Matches a request path against the route table (most specific path first)."""

    def __init__(self, routes: tuple[RouteSpec, ...] = ROUTES) -> None:
        compiled = []
        for spec in routes:
            for path, _ in spec.paths():
                pattern = re.escape(path)
                for param, regex in _PARAMETER_PATTERNS.items():
                    pattern = pattern.replace(re.escape("{" + param + "}"), regex)
                # "/v2" is also reached as "/v2/", as before.
                tail = "/?" if path == "/v2" else ""
                compiled.append((re.compile(f"^{pattern}{tail}$"), spec))
        self._routes = compiled

    def match(self, path: str, method: str) -> Match | None:
        """The route for `path`; `method_allowed` is False when the path exists for another method."""
        wrong: Match | None = None
        for pattern, spec in self._routes:
            m = pattern.match(path)
            if m is None:
                continue
            groups = m.groupdict()
            found = Match(
                spec, groups.get("name"), groups.get("version"), spec.method == method, groups.get("resource")
            )
            if found.method_allowed:
                return found
            wrong = wrong or found
        return wrong

    def allowed_methods(self, path: str) -> list[str]:
        return sorted({spec.method for pattern, spec in self._routes if pattern.match(path)})
