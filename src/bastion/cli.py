"""The `bastion` command line: a thin layer over the library; every error names its file and field."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from bastion.errors import (
    AuditIntegrityError,
    BastionError,
    BastionException,
    ConfigError,
    StateDirLocked,
    StateUnavailable,
)

if TYPE_CHECKING:
    import socket

    from bastion.audit.verify import AuditSource
    from bastion.config import Config
    from bastion.records import RecordStores
    from bastion.statedir import StateDirLock

log = logging.getLogger("bastion")


def _fail(message: str, code: int = 2) -> int:
    print(f"bastion: {message}", file=sys.stderr)
    return code


def _cell(value: object) -> str:
    """One table cell on one line: a control character in a name could break or forge the table."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print aligned columns, each as wide as its widest cell and two spaces from the next."""
    lines = [[_cell(c) for c in header], *([_cell(c) for c in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def _config(path: Path):  # type: ignore[no-untyped-def]
    from bastion.config import load_config

    return load_config(path)


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def cmd_serve(args: argparse.Namespace) -> int:
    if args.unsafe_no_defenses:
        # No key, limit, guard, output policy or audit: every model answers anyone in full. A benchmark
        # baseline on this host, never a listener others can reach (red team #9).
        config = _config(args.config)
        exposed = [("--host / [server] host", args.host or config.server.host)]
        if config.grpc.enabled:
            exposed.append(("[grpc] host", config.grpc.host))
        for field, host in exposed:
            if host not in _LOOPBACK:
                return _fail(
                    f"--unsafe-no-defenses serves every model to anyone, unaudited: only on a loopback "
                    f"host ({', '.join(_LOOPBACK)}), and {field} is {host!r}"
                )
    if getattr(args, "workers", 1) > 1:  # a supervisor over N worker processes (bastion.workers)
        from bastion.workers import supervise

        return supervise(args)
    return run_server(args)


def run_server(
    args: argparse.Namespace,
    *,
    sock: socket.socket | None = None,
    state_lock: StateDirLock | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> int:
    """One server process. `sock` and `state_lock`: a worker's listening socket and its supervisor's
    state-directory lock (bastion.workers); None binds `--host`/`--port` and takes the lock.
    `heartbeat`: called from the event loop every 0.1 s once the server listens (a worker's beat
    to its supervisor; a blocked loop stops calling it)."""
    import uvicorn

    from bastion.http.app import BastionApp
    from bastion.http.frontend import FrontendLimits, protocol_class, raise_fd_limit
    from bastion.http.shedding import LoadShedder
    from bastion.service import Bastion

    config = _config(args.config)
    # From here every line the server writes, uvicorn's and the libraries' too, goes through one
    # redacting chain, JSON by default ([logging] format; bastion.logs).
    from bastion.logs import configure as configure_logging

    configure_logging(config.logging.format, replace_all=True)
    server = config.server
    # Before any model loads: a max_connections the process cannot reach is refused now, not under attack.
    raise_fd_limit(server.max_connections, args.config)
    limits = FrontendLimits(
        max_header_bytes=server.max_header_bytes,
        max_header_fields=server.max_header_fields,
        head_timeout=server.head_timeout_seconds,
        body_timeout=server.body_timeout_seconds,
        keep_alive=server.keep_alive_seconds,
        send_timeout=server.send_timeout_seconds,
        max_body_bytes=config.limits.max_body_bytes,
        max_connections=server.max_connections,
    )
    tls = None
    tls_options: dict[str, Any] = {}
    if server.tls is not None:
        from bastion.tls import ServerTls, handshake_bound_loop_factory

        # Before any model loads: certificate files that cannot serve are refused now, naming the field.
        tls = ServerTls(server.tls, args.config)
        listening = tls.listening
        tls_options = {
            "ssl_context_factory": lambda _config, _default: listening,
            # A TLS handshake not done within the head timeout is cut off (bastion.tls).
            "loop": handshake_bound_loop_factory(server.head_timeout_seconds),
        }
    max_in_flight = (
        args.max_concurrency if args.max_concurrency is not None else server.max_concurrent_requests
    )
    # The audit commit thread needs the GIL for a moment when its fsync returns; by default a busy
    # event loop would make it wait 5 ms for a forced switch, and every waiting request with it.
    sys.setswitchinterval(0.0005)
    service = Bastion(
        config, config_path=args.config, unsafe_no_defenses=args.unsafe_no_defenses, state_lock=state_lock
    )
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    if tls is None and host not in _LOOPBACK:
        log.warning("serving plain HTTP on %s: production needs [server.tls], or a TLS proxy in front", host)
    uv = uvicorn.Config(
        LoadShedder(BastionApp(service, tls=tls), max_in_flight=max_in_flight),
        host=host,
        port=port,
        http=protocol_class(limits),  # every front-end limit lives there (bastion.http.frontend)
        ws="none",
        access_log=False,  # the audit log is the access log, without payloads or query strings
        log_level=args.log_level,
        log_config=None,  # no handlers of uvicorn's own: its loggers reach bastion.logs' chain
        lifespan="on",
        server_header=False,
        proxy_headers=False,  # X-Forwarded-For from a client must not rewrite the audited address
        timeout_keep_alive=server.keep_alive_seconds,
        # None: uvicorn's own limit counts connections, so idle sockets would shed health probes.
        limit_concurrency=None,
        timeout_graceful_shutdown=10,
        **tls_options,
    )
    server_class = uvicorn.Server
    if heartbeat is not None:
        beat = heartbeat

        class _BeatingServer(uvicorn.Server):
            async def on_tick(self, counter: int) -> bool:
                beat()  # uvicorn's main loop ticks every 0.1 s from startup's end until shutdown
                return await super().on_tick(counter)

        server_class = _BeatingServer
    try:
        server_class(uv).run(sockets=None if sock is None else [sock])
    finally:
        service.close()
    return 0


# Ten years: a lifetime past it is a mistake (or an overflow), not a plan.
MAX_KEY_LIFETIME_SECONDS = 10 * 365 * 86_400


def _expiry_seconds(text: str) -> int:
    """`--expires-in`: 0 once meant "never expires" (falsy), the opposite of what it says; a negative
    value made a key born expired; 10^20 never expired either (red team #9 F16)."""
    value = int(text)
    if not 1 <= value <= MAX_KEY_LIFETIME_SECONDS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_KEY_LIFETIME_SECONDS} seconds, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _records(config: Config) -> RecordStores:
    """The stores the server of this policy file uses: its state directory's SQLite files, or the
    Redis / PostgreSQL that `state.backend` names (bastion.records)."""
    from bastion.records import open_records
    from bastion.statedir import StatePaths

    return open_records(config, StatePaths(config.server.state_dir))


def _key_store(config_path: Path):  # type: ignore[no-untyped-def]
    config = _config(config_path)
    return config, _records(config).keys


def _isolation_store(config_path: Path):  # type: ignore[no-untyped-def]
    return _records(_config(config_path)).isolation


def _incident_store(config_path: Path):  # type: ignore[no-untyped-def]
    return _records(_config(config_path)).incidents


def _operator() -> str:
    """Who changed an incident from the command line: the local user (no secret)."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


def _audit_change(config_path: Path, route: str, target: str, change: str) -> str:
    """An audit record for a change made from the command line (a release, an incident moved or
    noted), in the chain the server of this policy file writes: `principal` the local operator, `via`
    "cli". Returns its request id (the incident's timeline cites it). Raises _CliError naming the
    chain when it cannot be written: the change is made, its record is missing, the command says so."""
    from bastion.audit.sink import open_sink
    from bastion.statedir import StatePaths

    config = _config(config_path)
    request_id = os.urandom(8).hex()
    body = {
        "ts": time.time(),
        "request_id": request_id,
        "route": route,
        "action": "admin",
        "principal": _operator(),
        "via": "cli",
        "decision": "allow",
        "reason": "ok",
        "status": None,  # not an HTTP request; the fields every request record has, so readers need no case
        "payload_hmac": None,
        "target": target,
        "change": change,
    }
    try:
        sink = open_sink(config.audit, StatePaths(config.server.state_dir))
        try:
            sink.append([body], time.time())
        finally:
            sink.close()
    except Exception as e:
        raise _CliError(
            f"the change was made but its audit record could not be written to the chain of "
            f"{config_path} ({type(e).__name__}): record it by hand"
        ) from None
    return request_id


def cmd_incidents_list(args: argparse.Namespace) -> int:
    from bastion.incidents import IncidentState

    store = _incident_store(args.config)
    state = IncidentState(args.state) if args.state else None
    rows = [
        (i.id, i.state.value, _when(i.opened_at), i.kind, i.model, i.principal or "-", i.action)
        for i in store.list(state=state, limit=args.limit)
    ]
    _table(("id", "state", "opened", "kind", "model", "principal", "containment"), rows)
    return 0


def cmd_incidents_show(args: argparse.Namespace) -> int:
    incident = _incident_store(args.config).get(args.id)
    print(json.dumps(incident.as_dict(), indent=2, sort_keys=True))
    return 0


def _move(args: argparse.Namespace, to: str) -> int:
    from bastion.incidents import IncidentState

    incident = _incident_store(args.config).transition(
        args.id, IncidentState(to), actor=_operator(), now=time.time(), note=args.note
    )
    print(f"incident {incident.id}: {incident.state.value}")
    _audit_change(args.config, "incident_transition", f"incident:{incident.id}", f"state={to}")
    return 0


def cmd_incidents_ack(args: argparse.Namespace) -> int:
    return _move(args, "investigating")


def cmd_incidents_resolve(args: argparse.Namespace) -> int:
    return _move(args, "closed" if args.close else "remediated")


def cmd_incidents_note(args: argparse.Namespace) -> int:
    incident = _incident_store(args.config).note(args.id, args.text, actor=_operator(), now=time.time())
    print(f"incident {incident.id}: note added ({len(incident.events)} events)")
    _audit_change(args.config, "incident_note", f"incident:{incident.id}", "note")
    return 0


def cmd_incidents_export(args: argparse.Namespace) -> int:
    """Markdown or JSON for a post-incident review, with the audit log's sequence numbers."""
    from bastion.audit.verify import AuditSource
    from bastion.incidents import export_markdown
    from bastion.statedir import StatePaths

    incident = _incident_store(args.config).get(args.id)
    config = _config(args.config)
    source = AuditSource.configured(config.audit, StatePaths(config.server.state_dir))
    seqs: dict[str, int] = {}
    if incident.request_id:
        seq = source.find_request(incident.request_id)  # in SQLite or PostgreSQL, as [audit] says
        if seq is not None:
            seqs[incident.request_id] = seq
    # The operators' changes since it opened: to the incident, and to what it contained (the key, or
    # the model for a model-wide one): acknowledgements, notes, releases, token revocations.
    targets = {f"incident:{incident.id}", incident.principal or f"model:{incident.model}"}
    found = source.find_changes(targets)
    changes = None if found is None else [c for c in found if float(c.get("ts") or 0) >= incident.opened_at - 1]
    if args.format == "json":
        doc = incident.as_dict()
        doc["audit_seq"] = seqs.get(incident.request_id or "")
        doc["audit_changes"] = changes
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(export_markdown(incident, seqs, changes), end="")
    return 0


def cmd_models_isolated(args: argparse.Namespace) -> int:
    rows = [(model, _when(since), reason) for model, since, reason in _isolation_store(args.config).list()]
    if rows:
        _table(("MODEL", "ISOLATED SINCE", "REASON"), rows)
    return 0


def cmd_models_release(args: argparse.Namespace) -> int:
    if not _isolation_store(args.config).release(args.model):
        return _fail(f"model {args.model!r} is not isolated", 1)
    print(f"released {args.model}; it is served again from the next request on")
    # Audited, and in the timeline of the model-wide incidents it ends (red team of issue 12, F4).
    request_id = _audit_change(args.config, "model_release", f"model:{args.model}", "released")
    _incident_store(args.config).record_release(
        f"model:{args.model}", actor=_operator(), now=time.time(), note=f"model released (request {request_id})"
    )
    return 0


# A key's name is shown by `keys list`, the dashboard and the audit log: a label, never a secret.
KEY_NAME_MAX = 64


def _key_name_problem(name: str) -> str | None:
    """Why `name` cannot name a key (without repeating it: it may be a secret), or None."""
    from bastion.keys import KEY_PREFIX, key_id_of

    starts = [i for i in range(len(name)) if name.startswith(KEY_PREFIX, i)]
    if any(key_id_of(name[i:]) is not None for i in starts):
        return (
            "--name holds an API key: a name is shown by `keys list` and the dashboard, so it is refused "
            "(and not repeated here). The secret is now in your shell history: revoke that key if it must "
            "stay secret"
        )
    if not name or len(name) > KEY_NAME_MAX or not name.isprintable():
        return f"--name must be 1 to {KEY_NAME_MAX} printable characters"
    return None


def cmd_keys_create(args: argparse.Namespace) -> int:
    problem = _key_name_problem(args.name)
    if problem is not None:
        return _fail(problem)
    config, store = _key_store(args.config)
    unknown = [r for r in args.role if r not in config.roles]
    if unknown:
        return _fail(
            f"{args.config}: roles: no role named {', '.join(map(repr, unknown))} "
            f"(defined: {', '.join(sorted(config.roles)) or 'none'})"
        )
    now = time.time()
    expires = now + args.expires_in if args.expires_in is not None else None
    new = store.create(name=args.name, roles=args.role, now=now, expires_at=expires)
    print(f"key id:  {new.record.key_id}", file=sys.stderr)
    print("api key (shown once, store it now):", file=sys.stderr)
    print(new.secret)
    return 0


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_keys_list(args: argparse.Namespace) -> int:
    _, store = _key_store(args.config)
    now = time.time()
    _table(
        ("KEY ID", "NAME", "ROLES", "STATUS", "CREATED", "EXPIRES"),
        (
            (k.key_id, k.name, ",".join(k.roles), k.status(now), _when(k.created_at), _when(k.expires_at))
            for k in store.list()
        ),
    )
    return 0


def _key_id_arg(value: str) -> str:
    """The key id a command acts on. A full key pasted by mistake is recognised and only its public
    id is used or shown; anything else that is not a key id is refused without being repeated."""
    from bastion.keys import key_id_of

    key_id = key_id_of(value)
    if key_id is None:
        raise _CliError(
            "expected a key id (the 16 hex digits `bastion keys list` shows, or cert:<name>); "
            "what was given is not repeated here, as it may be a secret"
        )
    if key_id != value:
        print(
            f"bastion: that is a full API key, not a key id; acting on its key id {key_id}. "
            "The secret is now in your shell history: revoke the key if it must stay secret.",
            file=sys.stderr,
        )
    return key_id


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    key_id = _key_id_arg(args.key_id)
    _, store = _key_store(args.config)
    if not store.revoke(key_id, now=time.time()):
        return _fail(f"no active key with id {key_id}", 1)
    print(f"revoked {key_id}; it is refused from the next request on")
    return 0


def cmd_keys_release(args: argparse.Namespace) -> int:
    key_id = _key_id_arg(args.key_id)
    config, store = _key_store(args.config)
    measures = _records(config).measures
    # A service identity's principal id is its own (cert:<name>); a key's is key:<id>.
    lifted = measures.release(key_id if key_id.startswith("cert:") else f"key:{key_id}")
    measures.close()
    released = store.release(key_id)
    if not released and not lifted:
        return _fail(f"key {key_id} is neither quarantined nor contained (or does not exist)", 1)
    print(f"released {key_id} from quarantine and containment; it is served from the next request on")
    # Audited, and in the timeline of the key's incidents not closed (red team of issue 12, F4).
    principal = key_id if key_id.startswith("cert:") else f"key:{key_id}"
    request_id = _audit_change(args.config, "key_release", principal, "released")
    what = ("quarantine lifted" if released else "") + (
        f"{', ' if released else ''}{lifted} timed step(s) lifted" if lifted else ""
    )
    _incident_store(args.config).record_release(
        principal, actor=_operator(), now=time.time(), note=f"key released: {what} (request {request_id})"
    )
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    records = _records(_config(args.config))
    try:
        entry = records.token_revocations.revoke(args.jti, now=time.time())
    except ValueError as e:
        return _fail(f"{e} (the `jti` of the token response, or an audit record's `token`)")
    finally:
        records.close()
    until = _when(entry.until)
    print(f"revoked token {args.jti}; refused by every server within a second (listed until {until})")
    return 0


def cmd_tokens_revoke_before(args: argparse.Namespace) -> int:
    key_id = _key_id_arg(args.key_id)
    now = time.time()
    records = _records(_config(args.config))
    try:
        entry = records.token_revocations.revoke_before(
            key_id, before=now if args.before is None else args.before, now=now
        )
    finally:
        records.close()
    print(f"revoked the tokens of {key_id} issued before {_when(entry.before)}; the key itself still works")
    return 0


def cmd_tokens_revoked(args: argparse.Namespace) -> int:
    records = _records(_config(args.config))
    try:
        entries = records.token_revocations.list(now=time.time())
    finally:
        records.close()
    _table(
        ("JTI", "KEY ID", "ISSUED BEFORE", "LISTED UNTIL"),
        ((e.jti or "-", e.key_id or "-", _when(e.before), _when(e.until)) for e in entries),
    )
    return 0


def _audit_source(args: argparse.Namespace) -> tuple[AuditSource, Path]:
    """The chain `--db` names, else the one the policy file's [audit] section names (a SQLite file in
    the state directory or a PostgreSQL table), and the public key to check its checkpoints with."""
    from bastion.audit.chain import public_path
    from bastion.audit.sink import signing_key_path
    from bastion.audit.verify import AuditSource
    from bastion.statedir import StatePaths

    if args.db is not None:
        return AuditSource.sqlite(args.db), args.public_key or args.db.with_name("audit_signing.pub")
    config = _config(args.config)
    paths = StatePaths(config.server.state_dir)
    pub = args.public_key or public_path(signing_key_path(config.audit, paths))
    return AuditSource.configured(config.audit, paths), pub


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from bastion.audit.chain import load_public_key
    from bastion.audit.verify import verify_chain

    source, pub = _audit_source(args)
    try:
        key = load_public_key(pub)
    except (OSError, ValueError) as e:
        return _fail(f"{pub}: cannot read the audit public key: {e}")
    try:
        report = verify_chain(*source.read(), key)
    except AuditIntegrityError as e:
        print(f"FAILED: {source.name}: {e}", file=sys.stderr)
        return 1
    print(
        f"OK: {source.name}: {report.records} records, {report.checkpoints} signed checkpoints, "
        f"head {report.head[:16]}"
    )
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    from bastion.audit.verify import export_rows

    source, _ = _audit_source(args)
    try:
        rows, _checkpoints = source.read()
    except AuditIntegrityError as e:
        return _fail(str(e))
    lines = export_rows(rows)
    if args.output is None:
        for line in lines:
            sys.stdout.write(line.decode() + "\n")
        return 0
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_bytes(b"".join(line + b"\n" for line in lines))
    tmp.replace(args.output)  # never a half-written export
    print(f"wrote {len(lines)} records to {args.output}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bastion.demo import ONNX_MODEL, REGRESSION_MODEL, SKOPS_MODEL, STATE_DIR, build_demo
    from bastion.keys import KeyStore
    from bastion.statedir import StatePaths, holder_pid

    # The state (keys, audit log, budgets) of an earlier run is kept unless --reset says otherwise:
    # its keys' secrets were shown once and cannot be shown again.
    if args.reset:
        # Wiping a running server's state would leave it writing to deleted files: refuse, and say who.
        pid = holder_pid(Path(args.dir) / STATE_DIR)
        if pid is not None:
            holder = f"PID {pid}" if pid > 0 else "a process whose PID is not recorded"
            return _fail(
                f"{args.dir}/{STATE_DIR} is held by a running server ({holder}): stop it before --reset"
            )
    print("training models on scikit-learn's breast-cancer and diabetes datasets ...", file=sys.stderr)
    try:
        if args.grpc_port is None:  # beside the HTTP port, so `--port` alone moves the whole demo
            args.grpc_port = 8001 if args.port == 8000 else args.port + 1
        build = build_demo(args.dir, port=args.port, grpc_port=args.grpc_port, keep_state=not args.reset)
    except FileExistsError as e:
        return _fail(str(e))
    if build.left:
        shown = ", ".join(build.left[:20]) + (
            f" and {len(build.left) - 20} more" if len(build.left) > 20 else ""
        )
        print(
            f"warning: {args.dir}/ holds entries the demo did not write, left as they are: {shown}",
            file=sys.stderr,
        )
    config = _config(build.config_path)
    store = KeyStore(StatePaths(config.server.state_dir).keys)
    kept = len(store.list())
    if kept:
        keys_text = f"""The state of the previous run is kept ({args.dir}/{STATE_DIR}/: {kept} keys, the audit log,
budgets). Those keys' secrets were shown when they were created and are not stored, so they are
not shown again. New keys:

  .venv/bin/bastion keys create --config {build.config_path} --name analyst2 --role analyst
  .venv/bin/bastion keys create --config {build.config_path} --name admin2 --role admin

or start afresh, wiping keys, audit log and budgets: .venv/bin/bastion demo --reset (make demo-reset)."""
    else:
        now = time.time()
        analyst = store.create(name="demo-analyst", roles=["analyst"], now=now).secret
        admin = store.create(name="demo-admin", roles=["admin"], now=now).secret
        keys_text = f"Two keys, shown once:\n\n  export ANALYST={analyst}\n  export ADMIN={admin}"
    store.close()
    base = f"http://127.0.0.1:{args.port}"
    req = f"{args.dir}/request.json"
    print(
        f"""
Demo written to {args.dir}/ (policy: {build.config_path}). {keys_text}

Try, in another terminal (with ANALYST and ADMIN set to an analyst's and an admin's key):

  curl -s {base}/v2/health/ready
  curl -s {base}/v2/models/{ONNX_MODEL}                                   # 401: no key
  curl -s -H "Authorization: Bearer $ANALYST" {base}/v2/models/{ONNX_MODEL}
  curl -s -H "Authorization: Bearer $ANALYST" -H 'Content-Type: application/json' \\
       -d @{req} {base}/v2/models/{ONNX_MODEL}/infer                       # label only
  curl -s -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \\
       -d @{req} {base}/v2/models/{SKOPS_MODEL}/infer                      # with probabilities
  curl -s -H "Authorization: Bearer $ANALYST" -H 'Content-Type: application/json' \\
       -d @{args.dir}/diabetes-request.json {base}/v2/models/{REGRESSION_MODEL}/infer   # DP-noised values
  curl -s -H "Authorization: Bearer $ANALYST" -H 'Content-Type: application/json' \\
       -d @{args.dir}/diabetes-batch.json {base}/v2/models/{REGRESSION_MODEL}/aggregate # DP sum and mean
  curl -s -H "Authorization: Bearer $ANALYST" -X POST {base}/v2/auth/token \\
       -d '{{"scope": ["infer:{ONNX_MODEL}"], "ttl_seconds": 300}}'            # a short-lived token
  curl -s -H "Authorization: Bearer $ADMIN" {base}/metrics | grep bastion_requests
  .venv/bin/bastion audit verify --config {build.config_path}
  .venv/bin/bastion verify {args.dir}/bundles/{ONNX_MODEL}-1 --trusted-key {args.dir}/keys/release.pub

V2 over gRPC (tritonclient.grpc, KServe) answers on 127.0.0.1:{args.grpc_port}, same keys (README "gRPC").
""",
        file=sys.stderr,
        flush=True,
    )
    if args.no_serve:
        return 0
    print(f"Serving on {base} (Ctrl-C to stop) ...", file=sys.stderr, flush=True)
    args.config, args.host, args.unsafe_no_defenses = build.config_path, None, False
    return cmd_serve(args)


def _passphrase(*, confirm: bool) -> bytes:
    import getpass
    import os

    from bastion.bundle.signing import PASSPHRASE_ENV

    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return value.encode()
    if not sys.stdin.isatty():
        raise _CliError(f"set {PASSPHRASE_ENV} (no terminal to ask for the signing key's passphrase)")
    first = getpass.getpass("signing key passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise _CliError("the passphrases differ")
    return first.encode()


class _CliError(BastionException):
    """A message for the operator; main() prints it and exits 2."""


def cmd_keygen(args: argparse.Namespace) -> int:
    from bastion.bundle.signing import generate_signing_key

    if args.output.exists():
        return _fail(f"{args.output}: already exists; refusing to overwrite a key")
    try:
        public = generate_signing_key(args.output, _passphrase(confirm=True))
    except ValueError as e:
        return _fail(str(e))
    print(f"private key (encrypted): {args.output}\npublic key: {public}")
    return 0


def cmd_kek(args: argparse.Namespace) -> int:
    from bastion.bundle.crypto import new_kek
    from bastion.files import write_private_file

    try:
        write_private_file(args.output, (new_kek() + "\n").encode())
    except FileExistsError:
        return _fail(f"{args.output}: already exists; refusing to overwrite a key")
    print(
        f'key-encryption key written to {args.output} (mode 0600); use decryption_key = "file:{args.output}"'
    )
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    import numpy as np
    from pydantic import ValidationError

    from bastion.bundle.crypto import LocalKeyProvider
    from bastion.bundle.format import Provenance
    from bastion.bundle.pack import pack
    from bastion.errors import ModelLoadError

    provenance = None
    if args.provenance is not None:
        try:
            provenance = json.loads(args.provenance.read_text(encoding="utf-8"))
            Provenance.model_validate({"created_by": "-", "created_at": "-", **provenance})
        except (OSError, json.JSONDecodeError) as e:
            return _fail(f"{args.provenance}: cannot read provenance: {e}")
        except ValidationError as e:
            err = e.errors()[0]
            return _fail(f"{args.provenance}: {'.'.join(map(str, err['loc']))}: {err['msg']}")
    try:
        # `is not None`: an empty --encrypt ("$KEK" with KEK unset) is refused, not a bundle left unencrypted.
        kek = LocalKeyProvider.from_spec(args.encrypt) if args.encrypt is not None else None
    except ValueError as e:
        return _fail(f"--encrypt: {e}")
    training = None
    if args.teachers:
        if args.training_data is None:
            return _fail("--teachers needs --training-data FILE.npz (arrays x and y)")
        x, y = _xy(args.training_data, "--training-data")
        training = (x.astype(np.float32), y)
    reference = None
    if args.reference_data is not None:
        try:
            with np.load(args.reference_data, allow_pickle=False) as data:
                reference = {name: np.asarray(data[name]) for name in data.files}
        except (OSError, ValueError) as e:
            return _fail(f"{args.reference_data}: not a readable .npz: {e}")
    try:
        digest = pack(
            args.model_dir,
            args.output,
            provenance=provenance,
            kek=kek,
            golden_rows=args.golden,
            seed=args.seed,
            tolerance=args.tolerance,
            teachers=args.teachers,
            training_data=training,
            reference_data=reference,
        )
    except (ModelLoadError, FileExistsError, ValueError) as e:
        return _fail(str(e))
    print(f"{args.output}: {digest}")
    return 0


def _decryption_key(spec: str | None):  # type: ignore[no-untyped-def]
    from bastion.bundle.crypto import LocalKeyProvider

    try:
        return LocalKeyProvider.from_spec(spec) if spec else None
    except ValueError as e:
        raise _CliError(f"--decryption-key: {e}") from None


def cmd_sign(args: argparse.Namespace) -> int:
    from bastion.bundle.signing import SignatureError, sign_bundle

    try:
        path = sign_bundle(args.bundle, args.key, _passphrase(confirm=False), progress=None)
    except SignatureError as e:
        return _fail(str(e))
    print(f"signed: {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from bastion.bundle.verify import BundleRefused, TrustPolicy, verify_bundle

    kek = _decryption_key(args.decryption_key)
    policy = TrustPolicy(
        trusted_keys=args.trusted_key, allow_env_drift=frozenset(args.allow_env_drift), kek=kek
    )
    try:
        verified = verify_bundle(args.bundle, policy, progress=None)
    except BundleRefused as e:
        print(f"REFUSED ({e.reason}): {e}", file=sys.stderr)
        return 1
    print(
        f"OK: {verified.manifest.name} {verified.manifest.version} {verified.digest} signed by {verified.signer}"
    )
    for warning in verified.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    store = _records(_config(args.config)).rollouts
    path = getattr(store, "path", "rollout state")  # the file, or the shared records
    states = store.load()
    if args.action == "status":
        _table(
            ("MODEL", "STABLE", "CANARY", "WEIGHT", "STATUS", "REASON"),
            (
                (model, s.stable, s.canary or "-", f"{s.weight:.2f}", s.status, s.reason)
                for model, s in sorted(states.items())
            ),
        )
        return 0
    if args.model is None:
        return _fail(f"rollout {args.action}: name the model")
    state = states.get(args.model)
    if state is None:
        return _fail(
            f"{path}: no rollout for model {args.model!r} (known: {', '.join(sorted(states)) or 'none'})"
        )
    if state.canary is None:
        return _fail(f"{args.model}: no canary to {args.action}")
    if args.action == "promote":
        state.stable, state.canary, state.weight, state.status = state.canary, None, 0.0, "promoted"
        state.reason = "promoted by an operator"
    else:
        state.weight, state.status, state.reason = 0.0, "rolled_back", "rolled back by an operator"
    state.changed_at = time.time()
    store.save(states)
    print(f"{args.model}: {state.status}; a running server applies it within a second")
    return 0


def cmd_registry_push(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from bastion.bundle.verify import BundleRefused, TrustPolicy, verify_bundle

    kek = _decryption_key(args.decryption_key)
    try:
        verified = verify_bundle(args.bundle, TrustPolicy(trusted_keys=args.trusted_key, kek=kek))
    except BundleRefused as e:
        print(f"REFUSED ({e.reason}): {e}", file=sys.stderr)
        return 1
    target = args.registry / verified.manifest.name / verified.manifest.version
    if target.exists():
        return _fail(f"{target}: already in the registry; versions are immutable")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{verified.manifest.version}.", dir=target.parent))
    shutil.copytree(args.bundle, staging, dirs_exist_ok=True)
    staging.rename(target)  # all or nothing
    print(f"{target}: {verified.digest}")
    return 0


def cmd_registry_list(args: argparse.Namespace) -> int:
    import hashlib

    from bastion.bundle.format import BUNDLE_FILE

    rows = [
        (
            bundle.parent.parent.name,
            bundle.parent.name,
            f"sha256:{hashlib.sha256(bundle.read_bytes()).hexdigest()}",
        )
        for bundle in sorted(args.registry.glob(f"*/*/{BUNDLE_FILE}"))
    ]
    if rows:
        _table(("MODEL", "VERSION", "BUNDLE DIGEST"), rows)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from bastion.config import check_against_models
    from bastion.registry import ModelRegistry

    config = _config(args.config)
    if config.server.tls is not None:  # the certificate files, as start-up reads them (before any model)
        from bastion.tls import ServerTls

        tls = ServerTls(config.server.tls, args.config)
        print(f"ok      TLS certificate serial {tls.material.serial:x}, client certificates {tls.settings.client_auth}")
    registry = ModelRegistry.load(list(config.models))
    check_against_models(config, registry, args.config)  # the same checks as start-up
    for model in registry.models():
        print(f"ok      {model.name} {model.version} {model.digest}")
    for path, reason in registry.failures.items():
        print(f"REFUSED {path}: {reason}")
    # Every shared backend the file names answers now (a server would start not ready, or fail).
    from bastion.records import check_backends

    unreachable = False
    for setting, where, problem in check_backends(config):
        if problem is None:
            print(f"ok      {setting} {where} answers")
        else:
            unreachable = True
            print(f"UNREACHABLE {args.config}: {setting} ({where}): {problem}")
    return 1 if registry.failures or unreachable else 0


def _xy(path: Path, flag: str) -> tuple[Any, Any]:
    """Rows and labels from an .npz with arrays x and y (never unpickled)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["x"]), np.asarray(data["y"])
    except (OSError, KeyError, ValueError) as e:
        raise _CliError(f"{flag} {path}: needs arrays 'x' and 'y' in an .npz: {e}") from None


def cmd_redteam_membership(args: argparse.Namespace) -> int:
    """Attack a running server's model with membership inference; exit 1 if a threshold is passed."""
    import os

    import numpy as np

    key = os.environ.get(args.key_env)
    if not key:
        return _fail(f"--key-env: set {args.key_env} to the API key or token to attack with")
    (mx, my), (nx, ny) = _xy(args.members, "--members"), _xy(args.nonmembers, "--nonmembers")
    try:
        from bastion.redteam import Gate, RemoteError, RemoteModel, membership_inference
    except ImportError:
        return _fail("the red-team harness needs IBM ART: pip install 'bastion-serve[redteam]'")
    try:
        remote = RemoteModel(args.url, args.model, key, batch=args.batch)
        members, nonmembers = (mx, remote.labels(my)), (nx, remote.labels(ny))
        x = np.concatenate([mx, nx]).astype(np.float64)
        result = membership_inference(
            remote.predict,
            members=members,
            nonmembers=nonmembers,
            nb_classes=len(remote.classes),
            clip_values=(float(x.min()), float(x.max())),
            seed=args.seed,
        )
    except RemoteError as e:
        return _fail(str(e))
    gate = Gate(
        max_auc=args.max_auc,
        max_accuracy=args.max_accuracy,
        max_tpr_at_1pct_fpr=args.max_tpr_at_1pct_fpr,
        max_gap_accuracy=args.max_gap_accuracy,
        min_benign_accuracy=args.min_benign_accuracy,
    )
    failures = gate.failures(result)
    report = {"model": args.model, **vars(result), "passed": not failures, "failures": failures}
    print(json.dumps(report, indent=2))
    if failures:
        print(f"bastion: privacy gate failed: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0


# A run of characters argparse may have copied from the command line into an error message.
_ECHOED_RUN = re.compile(r"[^\s'\",=]{6,}")


class _Parser(argparse.ArgumentParser):
    """argparse quotes the offending argument in its errors ("unrecognized arguments: ...", "ignored
    explicit argument ..."); a key pasted in the wrong place, or one that starts with "-" and reads as
    an option, must not be printed back to a terminal or a CI log. Any run of six or more characters
    that came from the command line, and is not one of the parser's own words, is shown as "<hidden>".
    """

    given: Sequence[str] = ()  # the command line being parsed; set by main()

    def error(self, message: str) -> NoReturn:
        own_words = self.format_help()
        given = self.given

        def hide(match: re.Match[str]) -> str:
            run = match.group(0)
            if run in own_words or not any(run in arg for arg in given):
                return run
            return "<hidden>"

        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {_ECHOED_RUN.sub(hide, message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bastion", description="A secure model server.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", type=Path, default=Path("bastion.toml"), help="policy file (TOML)")
        return p

    serve = with_config(sub.add_parser("serve", help="serve the models in the policy file"))
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--max-concurrency",
        type=_positive_int,
        help="requests in flight (not connections) before new ones get 503 overloaded; "
        "overrides [server] max_concurrent_requests",
    )
    serve.add_argument(
        "--unsafe-no-defenses",
        action="store_true",
        help="benchmark baseline only: no auth, limits, guard or audit",
    )
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="worker processes sharing the port (SO_REUSEPORT), each with the whole pipeline, under a "
        "supervisor that restarts a dead one; more than 1 needs a shared [state] backend (not memory)",
    )
    serve.set_defaults(func=cmd_serve)

    check = with_config(sub.add_parser("check", help="validate the policy file and load every model"))
    check.set_defaults(func=cmd_check)

    keys = sub.add_parser("keys", help="create, list and revoke API keys").add_subparsers(
        dest="keys", required=True
    )
    create = with_config(keys.add_parser("create", help="create a key and print it once"))
    create.add_argument("--name", required=True)
    create.add_argument(
        "--role", action="append", required=True, help="role from the policy file (repeatable)"
    )
    create.add_argument(
        "--expires-in",
        type=_expiry_seconds,
        metavar="SECONDS",
        help=f"the key stops working after this long (1 to {MAX_KEY_LIFETIME_SECONDS:,} s); without it, never",
    )
    create.set_defaults(func=cmd_keys_create)
    with_config(keys.add_parser("list", help="list keys (never their secrets)")).set_defaults(
        func=cmd_keys_list
    )
    revoke = with_config(keys.add_parser("revoke", help="revoke a key; effective on the next request"))
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_keys_revoke)
    release = with_config(
        keys.add_parser("release", help="lift a key's quarantine (query auditing); effective at once")
    )
    release.add_argument("key_id")
    release.set_defaults(func=cmd_keys_release)

    tokens = sub.add_parser("tokens", help="revoke tokens (the deny list)").add_subparsers(
        dest="tokens_command", required=True
    )
    revoke_token = with_config(
        tokens.add_parser("revoke", help="revoke one token by its jti; refused everywhere within a second")
    )
    revoke_token.add_argument("jti", help="the token response's jti (or an audit record's `token`)")
    revoke_token.set_defaults(func=cmd_tokens_revoke)
    revoke_before = with_config(
        tokens.add_parser("revoke-before", help="revoke every token of a key issued before a time")
    )
    revoke_before.add_argument("key_id")
    revoke_before.add_argument("--before", type=float, metavar="UNIX_SECONDS", help="default, at most: now")
    revoke_before.set_defaults(func=cmd_tokens_revoke_before)
    with_config(tokens.add_parser("revoked", help="list the deny list's entries in force")).set_defaults(
        func=cmd_tokens_revoked
    )

    models = sub.add_parser("models", help="models isolated by query auditing").add_subparsers(
        dest="models_command", required=True
    )
    with_config(models.add_parser("isolated", help="list isolated models")).set_defaults(
        func=cmd_models_isolated
    )
    release_model = with_config(models.add_parser("release", help="serve an isolated model again"))
    release_model.add_argument("model")
    release_model.set_defaults(func=cmd_models_release)
    incidents = sub.add_parser("incidents", help="incidents recorded by query auditing").add_subparsers(
        dest="incidents_command", required=True
    )
    listing = with_config(incidents.add_parser("list", help="newest first"))
    listing.add_argument(
        "--state", choices=["open", "contained", "investigating", "remediated", "closed"], default=None
    )
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=cmd_incidents_list)
    for name, func, text in (
        ("show", cmd_incidents_show, "one incident with its timeline, as JSON"),
        ("ack", cmd_incidents_ack, "acknowledge: investigating"),
        ("resolve", cmd_incidents_resolve, "remediated (or closed with --close)"),
        ("note", cmd_incidents_note, "add a note to the timeline"),
        ("export", cmd_incidents_export, "Markdown or JSON for a post-incident review"),
    ):
        p = with_config(incidents.add_parser(name, help=text))
        p.add_argument("id", type=int)
        if name in ("ack", "resolve"):
            p.add_argument("--note", default=None)
        if name == "resolve":
            p.add_argument("--close", action="store_true", help="closed: reviewed and archived")
        if name == "note":
            p.add_argument("text")
        if name == "export":
            p.add_argument("--format", choices=["markdown", "json"], default="markdown")
        p.set_defaults(func=func)
    audit = sub.add_parser("audit", help="verify and export the audit log").add_subparsers(
        dest="audit", required=True
    )
    for name, func, text in (
        ("verify", cmd_audit_verify, "verify the hash chain and signed checkpoints"),
        ("export", cmd_audit_export, "write the records as JSON lines"),
    ):
        p = with_config(audit.add_parser(name, help=text))
        p.add_argument("--db", type=Path, help="audit database (default: from the policy file)")
        p.add_argument("--public-key", type=Path, help="checkpoint public key (default: beside the database)")
        if name == "export":
            p.add_argument("--output", "-o", type=Path)
        p.set_defaults(func=func)

    keygen = sub.add_parser("keygen", help="create an encrypted ECDSA P-256 signing key and its public key")
    keygen.add_argument(
        "--output", "-o", type=Path, required=True, help="private key path (.pub written beside)"
    )
    keygen.set_defaults(func=cmd_keygen)
    kek = sub.add_parser("kek", help="create a key-encryption key file for encrypted bundles")
    kek.add_argument("--output", "-o", type=Path, required=True)
    kek.set_defaults(func=cmd_kek)
    pack = sub.add_parser("pack", help="build an immutable bundle from a model directory")
    pack.add_argument("model_dir", type=Path)
    pack.add_argument("--output", "-o", type=Path, required=True)
    pack.add_argument("--encrypt", metavar="KEY", help="seal model files; KEY is env:NAME or file:PATH")
    pack.add_argument("--provenance", type=Path, help="JSON: training_data_sha256, preprocessing, seeds, ...")
    pack.add_argument("--golden", type=int, default=8, help="golden sample rows (default 8)")
    pack.add_argument("--seed", type=int, default=0)
    pack.add_argument("--tolerance", type=float, default=1e-5, help="golden output tolerance (absolute)")
    pack.add_argument(
        "--teachers", type=int, default=0, help="train N teachers for private prediction (sklearn)"
    )
    pack.add_argument("--training-data", type=Path, help=".npz with arrays x and y, for --teachers")
    pack.add_argument(
        "--reference-data", type=Path, help=".npz with one array per input: the set /aggregate serves"
    )
    pack.set_defaults(func=cmd_pack)
    sign = sub.add_parser("sign", help="sign a bundle (OpenSSF model-signing format)")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True)
    sign.set_defaults(func=cmd_sign)
    verify = sub.add_parser("verify", help="verify a bundle as the server would before loading it")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--trusted-key", type=Path, action="append", required=True)
    verify.add_argument("--decryption-key", metavar="KEY")
    verify.add_argument("--allow-env-drift", action="append", default=[], metavar="PACKAGE")
    verify.set_defaults(func=cmd_verify)

    rollout = with_config(sub.add_parser("rollout", help="show or drive canary rollouts of a running server"))
    rollout.add_argument("action", choices=["status", "promote", "rollback"])
    rollout.add_argument("model", nargs="?")
    rollout.set_defaults(func=cmd_rollout)
    redteam = sub.add_parser("redteam", help="attack a running server to measure (and gate on) what it leaks")
    redteam_sub = redteam.add_subparsers(dest="redteam_cmd", required=True)
    mi = redteam_sub.add_parser(
        "membership",
        help="membership inference (IBM ART black-box and the label-only gap attack) over the V2 API; "
        "exit 1 if a threshold is passed",
    )
    mi.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    mi.add_argument("--model", required=True)
    mi.add_argument(
        "--key-env", default="BASTION_KEY", help="environment variable holding the attacker's key"
    )
    mi.add_argument(
        "--members", type=Path, required=True, help=".npz with x and y: rows the model trained on"
    )
    mi.add_argument("--nonmembers", type=Path, required=True, help=".npz with x and y: rows it never saw")
    mi.add_argument("--batch", type=int, default=256, help="rows per request")
    mi.add_argument("--seed", type=int, default=0)
    mi.add_argument("--max-auc", type=float)
    mi.add_argument("--max-accuracy", type=float)
    mi.add_argument("--max-tpr-at-1pct-fpr", type=float)
    mi.add_argument("--max-gap-accuracy", type=float)
    mi.add_argument("--min-benign-accuracy", type=float)
    mi.set_defaults(func=cmd_redteam_membership)
    from bastion.redteam_cli import add_run_parser

    add_run_parser(redteam_sub)  # `bastion redteam run`: extraction, evasion, membership; HTML report

    registry = sub.add_parser("registry", help="a local registry of bundles by name and version")
    registry_sub = registry.add_subparsers(dest="registry_cmd", required=True)
    push = registry_sub.add_parser("push", help="verify a bundle and store it, immutable, under NAME/VERSION")
    push.add_argument("bundle", type=Path)
    push.add_argument("--registry", type=Path, required=True)
    push.add_argument("--trusted-key", type=Path, action="append", required=True)
    push.add_argument(
        "--decryption-key", metavar="KEY", help="for an encrypted bundle: env:NAME or file:PATH"
    )
    push.set_defaults(func=cmd_registry_push)
    rlist = registry_sub.add_parser("list", help="list bundles with their digests")
    rlist.add_argument("--registry", type=Path, required=True)
    rlist.set_defaults(func=cmd_registry_list)

    demo = sub.add_parser("demo", help="build a demo deployment and serve it")
    demo.add_argument("--dir", type=Path, default=Path("demo"))
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument(
        "--grpc-port", type=int, default=None, help="V2 over gRPC (default 8001; with --port P, P + 1)"
    )
    demo.add_argument("--no-serve", action="store_true")
    demo.add_argument(
        "--reset",
        action="store_true",
        help="wipe the state of an earlier run (keys, audit log, budgets); by default it is kept",
    )
    demo.add_argument("--log-level", default="info")
    demo.add_argument("--max-concurrency", type=int)
    demo.set_defaults(func=cmd_demo)
    from bastion.status import add_status_parser

    add_status_parser(sub)  # `bastion status`: a running server summarised over HTTP
    return parser


def main(argv: list[str] | None = None) -> int:
    # Every command's lines go through the redacting chain (bastion.logs), as the server's do; `serve`
    # replaces it with the policy file's format. The commands that talk HTTP (status, redteam, rollout)
    # do not print httpx's line per request: a URL may carry credentials (red team of issue 12, F6).
    from bastion.logs import configure as configure_logging

    handler = configure_logging("text")
    try:
        return _main(argv)
    finally:  # for callers that run main() in their own process (the tests): their handlers as they were
        logging.getLogger().removeHandler(handler)


def _main(argv: list[str] | None) -> int:
    _Parser.given = tuple(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command not in ("serve", "demo"):
        logging.getLogger("httpx").setLevel(logging.WARNING)
    # Every file a command or the server writes (keys, audit records, budgets, rollouts, the demo's
    # keys) is owner-only from its first byte, whatever the shell's umask; worker processes inherit it.
    # Restored on return for callers that run main() in their own process (the tests).
    umask = os.umask(0o077)
    try:
        return _run(args)
    finally:
        os.umask(umask)


def _run(args: argparse.Namespace) -> int:
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's final flush
        return code
    except BrokenPipeError:
        # `bastion keys list | head`: the reader closed the pipe. Stop quietly, as Python's docs advise
        # (library/signal.html, "Note on SIGPIPE"): stdout goes to /dev/null so the flush at exit
        # cannot raise again. Exit 0, not 1 and not 141 (death by SIGPIPE, what `yes | head` gives): the
        # reader took all it wanted, nothing failed, and a script under `set -o pipefail` must not see
        # a failure. Only output is cut short: every command changes state before it prints.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ConfigError, StateDirLocked, _CliError) as e:
        return _fail(str(e))
    except StateUnavailable as e:  # which setting (and host:port) of which file did not answer
        where = f" ({e.source} in {args.config})" if e.source and getattr(args, "config", None) else ""
        return _fail(f"{e.message}{where}", 1)
    except BastionError as e:  # a refusal of the library's (no such incident, a move not allowed)
        return _fail(e.message, 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
