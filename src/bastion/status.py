"""`bastion status`: what a running server says about itself, over its own HTTP API, with one key.

Health (live, ready), the server's name and version, the models this key can see with their
versions, and with an admin key: incidents by state, the keys quarantined by open incidents, and
request, denial and refusal counts read from `/metrics` (parsed by prometheus_client's own parser).
What the key may not see is reported as such, never guessed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bastion.errors import BastionException


class StatusError(BastionException):
    """The server could not be reached or refused the key outright; the message says which."""


@dataclass
class ServerStatus:
    url: str  # as redact_url prints it
    live: bool
    ready: bool
    ready_detail: str  # the readiness answer's status line
    server: dict[str, Any] = field(default_factory=dict)  # name, version (/v2)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> versions, platform
    language_models: list[str] = field(default_factory=list)
    admin: bool = False  # whether /metrics and the admin API answered this key
    incidents_by_state: dict[str, int] = field(default_factory=dict)
    quarantined_keys: list[dict[str, Any]] = field(default_factory=list)  # principal, model, incident
    contained: list[dict[str, Any]] = field(default_factory=list)  # the ladder's timed steps in force
    requests: dict[str, int] = field(default_factory=dict)  # allow, deny
    denials_by_status: dict[str, int] = field(default_factory=dict)
    auth_failures: dict[str, int] = field(default_factory=dict)
    rate_limited: dict[str, int] = field(default_factory=dict)
    audit_failures: int = 0
    guard_hits: int = 0
    notes: list[str] = field(default_factory=list)  # what this key could not see


def _parse_metrics(text: str, status: ServerStatus) -> set[str]:
    """Fill the counts from Prometheus text; return the model names the metrics mention."""
    from prometheus_client.parser import text_string_to_metric_families

    models: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, int(sample.value)
            model = labels.get("model")
            if model and not model.startswith("_"):
                models.add(model)
            if sample.name == "bastion_requests_total":
                decision = labels.get("decision", "?")
                status.requests[decision] = status.requests.get(decision, 0) + value
                if decision == "deny":
                    code = labels.get("status", "?")
                    status.denials_by_status[code] = status.denials_by_status.get(code, 0) + value
            elif sample.name == "bastion_auth_failures_total":
                reason = labels.get("reason", "?")
                status.auth_failures[reason] = status.auth_failures.get(reason, 0) + value
            elif sample.name == "bastion_rate_limited_total":
                code = labels.get("code", "?")
                status.rate_limited[code] = status.rate_limited.get(code, 0) + value
            elif sample.name == "bastion_incidents_by_state":
                status.incidents_by_state[labels.get("state", "?")] = value
            elif sample.name == "bastion_audit_failures_total":
                status.audit_failures += value
            elif sample.name == "bastion_llm_guard_hits_total":
                status.guard_hits += value
    return models


def fetch_status(url: str, key: str, *, models: tuple[str, ...] = (), timeout: float = 10.0) -> ServerStatus:
    """Ask the server at `url` (http:// or https://) with `key`. `models`: names to describe besides
    those the metrics mention. Raises StatusError when the server cannot be reached or answers 401."""
    from bastion.redteam import redact_url

    if not url.startswith(("http://", "https://")):
        raise StatusError(f"{redact_url(url)!r}: the server's URL must start with http:// or https://")
    shown = redact_url(url)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(base_url=url.rstrip("/"), timeout=timeout) as client:
            live = client.get("/v2/health/live")
            ready = client.get("/v2/health/ready")
            status = ServerStatus(
                url=shown,
                live=live.status_code == 200,
                ready=ready.status_code == 200,
                ready_detail=f"HTTP {ready.status_code}",
            )
            server = client.get("/v2", headers=headers)
            if server.status_code == 401:
                raise StatusError(f"{shown}: HTTP 401: the key was not accepted")
            if server.status_code == 200:
                status.server = {k: server.json().get(k) for k in ("name", "version")}
            names = set(models)
            metrics = client.get("/metrics", headers=headers)
            if metrics.status_code == 200:
                status.admin = True
                names |= _parse_metrics(metrics.text, status)
            else:
                status.notes.append(f"/metrics: HTTP {metrics.status_code} (an admin key sees the counts)")
            incidents = client.get("/v2/admin/incidents", headers=headers)
            summary = client.get("/v2/admin/summary", headers=headers)
            if incidents.status_code == 200 and summary.status_code == 200:
                body, served = incidents.json(), summary.json()
                status.incidents_by_state = {**status.incidents_by_state, **body.get("counts", {})}
                # Which keys are quarantined is the key store's word (the summary), not the incidents':
                # a release changes no incident, and an incident moved on may leave its key quarantined.
                latest: dict[str, dict[str, Any]] = {}  # principal -> its newest incident
                for i in body.get("incidents", []):
                    latest.setdefault(i.get("principal"), i)
                status.quarantined_keys = []
                for k in served.get("quarantined_keys", []):
                    key_id = str(k["key_id"])  # a key's id, or a service identity's cert:<name>
                    principal = key_id if key_id.startswith("cert:") else f"key:{key_id}"
                    incident = latest.get(principal) or {}
                    status.quarantined_keys.append(
                        {
                            "principal": principal,
                            "name": k.get("name"),
                            "model": incident.get("model"),
                            "incident": incident.get("id"),
                            "state": incident.get("state"),
                        }
                    )
                status.contained = list(served.get("contained", []))
                names |= {m["name"] for m in served.get("models", {}).get("served", []) if "name" in m}
            else:
                status.notes.append(
                    f"/v2/admin/incidents and /v2/admin/summary: HTTP {incidents.status_code}, {summary.status_code}"
                )
                if not models:  # the V2 API lists models to no one; the admin summary does, to admins
                    status.notes.append(
                        "models: the models this key may use are listed to admins only; "
                        "name them with --model NAME"
                    )
            llm = client.get("/v1/models", headers=headers)
            if llm.status_code == 200:
                status.language_models = sorted(str(m.get("id")) for m in llm.json().get("data", []))
            for name in sorted(names - set(status.language_models)):
                meta = client.get(f"/v2/models/{name}", headers=headers)
                if meta.status_code == 200:
                    doc = meta.json()
                    status.models[name] = {"versions": doc.get("versions", []), "platform": doc.get("platform")}
                else:
                    status.models[name] = {"error": f"HTTP {meta.status_code}"}
    except httpx.HTTPError as e:
        raise StatusError(f"cannot reach {shown}: {type(e).__name__}") from None
    except ValueError:  # a body that is not the JSON the API documents
        raise StatusError(f"{shown}: an answer was not JSON; is this a Bastion server?") from None
    return status


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def render(status: ServerStatus) -> str:
    """The summary as lines of text for a terminal."""
    from bastion.cli import _cell  # one cell on one line: a name with a control character is defused

    lines = [
        f"server   {_cell(status.url)}  {_cell(status.server.get('name', '?'))} "
        f"{_cell(status.server.get('version', '?'))}",
        f"health   live {'yes' if status.live else 'NO'}, ready {'yes' if status.ready else 'NO'} "
        f"({status.ready_detail})",
    ]
    for name, info in sorted(status.models.items()):
        if "error" in info:
            lines.append(f"model    {_cell(name)}: not visible to this key ({info['error']})")
        else:
            versions = ", ".join(_cell(v) for v in info["versions"]) or "?"
            lines.append(f"model    {_cell(name)}  versions {versions}  ({_cell(info.get('platform'))})")
    for name in status.language_models:
        lines.append(f"model    {_cell(name)}  (language model, /v1)")
    if status.admin:
        lines += [
            f"incidents  {_counts(status.incidents_by_state)}",
            f"requests   {_counts(status.requests)}",
            f"denials    by status: {_counts(status.denials_by_status)}",
            f"auth       failures: {_counts(status.auth_failures)}; rate limited: {_counts(status.rate_limited)}",
            f"audit      failures: {status.audit_failures}; llm guard hits: {status.guard_hits}",
        ]
        if status.quarantined_keys:
            for q in status.quarantined_keys:
                lines.append(
                    f"quarantined  {_cell(q['principal'])} on {_cell(q['model'])} "
                    f"(incident {q['incident']}, {_cell(q['state'])})"
                )
        else:
            lines.append("quarantined  none")
        for c in status.contained:
            lines.append(f"contained  {_cell(c['principal'])} on {_cell(c['model'])}: {_cell(c['step'])}")
    lines += [f"note     {n}" for n in status.notes]
    return "\n".join(lines)


def _key(spec: str) -> str:
    kind, _, value = spec.partition(":")
    if kind == "env" and value:
        key = os.environ.get(value, "")
        if not key:
            raise StatusError(f"--key env:{value}: the variable is not set")
        return key
    if kind == "file" and value:
        try:
            return Path(value).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise StatusError(f"--key file:{value}: {e.strerror}") from None
    raise StatusError("--key: give env:NAME or file:PATH (a key on the command line would show in ps)")


def add_status_parser(sub: Any) -> None:
    """Add `status` to the `bastion` subcommands (an argparse subparsers action)."""
    p = sub.add_parser("status", help="summarise a running server: health, models, incidents, counts")
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--key", default="env:BASTION_KEY", help="env:NAME or file:PATH (default env:BASTION_KEY)")
    p.add_argument("--model", action="append", default=[], help="a model to describe (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 when the server is live and ready, 1 when not, 2 when it cannot be asked."""
    try:
        status = fetch_status(args.url, _key(args.key), models=tuple(args.model))
    except StatusError as e:
        print(f"bastion: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(status), indent=2) if args.json else render(status))
    return 0 if status.live and status.ready else 1
