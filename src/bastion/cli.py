"""The `bastion` command line: a thin layer over the library; every error names its file and field."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bastion.errors import AuditIntegrityError, ConfigError

log = logging.getLogger("bastion")


def _fail(message: str, code: int = 2) -> int:
    print(f"bastion: {message}", file=sys.stderr)
    return code


def _config(path: Path):  # type: ignore[no-untyped-def]
    from bastion.config import load_config

    return load_config(path)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from bastion.http.app import BastionApp
    from bastion.service import Bastion

    config = _config(args.config)
    # The audit commit thread needs the GIL for a moment when its fsync returns; by default a busy
    # event loop would make it wait 5 ms for a forced switch, and every waiting request with it.
    sys.setswitchinterval(0.0005)
    service = Bastion(config, config_path=args.config, unsafe_no_defenses=args.unsafe_no_defenses)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    uv = uvicorn.Config(
        BastionApp(service),
        host=host,
        port=port,
        access_log=False,  # the audit log is the access log, without payloads or query strings
        log_level=args.log_level,
        lifespan="on",
        server_header=False,
        proxy_headers=False,  # X-Forwarded-For from a client must not rewrite the audited address
        timeout_keep_alive=5,
        limit_concurrency=args.max_concurrency,
        timeout_graceful_shutdown=10,
    )
    try:
        uvicorn.Server(uv).run()
    finally:
        service.close()
    return 0


def _key_store(config_path: Path):  # type: ignore[no-untyped-def]
    from bastion.keys import KeyStore
    from bastion.service import StatePaths

    config = _config(config_path)
    return config, KeyStore(StatePaths(config.server.state_dir).keys)


def cmd_keys_create(args: argparse.Namespace) -> int:
    config, store = _key_store(args.config)
    unknown = [r for r in args.role if r not in config.roles]
    if unknown:
        return _fail(
            f"{args.config}: roles: no role named {', '.join(map(repr, unknown))} "
            f"(defined: {', '.join(sorted(config.roles)) or 'none'})"
        )
    now = time.time()
    expires = now + args.expires_in if args.expires_in else None
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
    print(f"{'KEY ID':<18}{'NAME':<20}{'ROLES':<20}{'STATUS':<9}{'CREATED':<22}EXPIRES")
    for k in store.list():
        print(
            f"{k.key_id:<18}{k.name[:19]:<20}{','.join(k.roles)[:19]:<20}{k.status(now):<9}"
            f"{_when(k.created_at):<22}{_when(k.expires_at)}"
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    _, store = _key_store(args.config)
    if not store.revoke(args.key_id, now=time.time()):
        return _fail(f"no active key with id {args.key_id!r}", 1)
    print(f"revoked {args.key_id}; it is refused from the next request on")
    return 0


def _audit_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    from bastion.service import StatePaths

    if args.db is not None:
        return args.db, args.public_key or args.db.with_name("audit_signing.pub")
    paths = StatePaths(_config(args.config).server.state_dir)
    return paths.audit, args.public_key or paths.audit_public_key


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from bastion.audit import verify_audit
    from bastion.audit.chain import load_public_key

    db, pub = _audit_paths(args)
    try:
        key = load_public_key(pub)
    except (OSError, ValueError) as e:
        return _fail(f"{pub}: cannot read the audit public key: {e}")
    try:
        report = verify_audit(db, key)
    except AuditIntegrityError as e:
        print(f"FAILED: {db}: {e}", file=sys.stderr)
        return 1
    print(
        f"OK: {db}: {report.records} records, {report.checkpoints} signed checkpoints, head {report.head[:16]}"
    )
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    from bastion.audit.verify import export_records

    db, _ = _audit_paths(args)
    if not db.is_file():
        return _fail(f"{db}: audit database not found")
    lines = export_records(db)
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
    from bastion.demo import ONNX_MODEL, SKOPS_MODEL, build_demo
    from bastion.keys import KeyStore
    from bastion.service import StatePaths

    print("training a classifier on scikit-learn's breast-cancer dataset ...", file=sys.stderr)
    build = build_demo(args.dir, port=args.port)
    config = _config(build.config_path)
    store = KeyStore(StatePaths(config.server.state_dir).keys)
    now = time.time()
    analyst = store.create(name="demo-analyst", roles=["analyst"], now=now).secret
    admin = store.create(name="demo-admin", roles=["admin"], now=now).secret
    store.close()
    base = f"http://127.0.0.1:{args.port}"
    req = f"{args.dir}/request.json"
    print(
        f"""
Demo written to {args.dir}/ (policy: {build.config_path}). Two keys, shown once:

  export ANALYST={analyst}
  export ADMIN={admin}

Try, in another terminal (after the two exports):

  curl -s {base}/v2/health/ready
  curl -s {base}/v2/models/{ONNX_MODEL}                                   # 401: no key
  curl -s -H "Authorization: Bearer $ANALYST" {base}/v2/models/{ONNX_MODEL}
  curl -s -H "Authorization: Bearer $ANALYST" -H 'Content-Type: application/json' \\
       -d @{req} {base}/v2/models/{ONNX_MODEL}/infer                       # label only
  curl -s -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \\
       -d @{req} {base}/v2/models/{SKOPS_MODEL}/infer                      # with probabilities
  curl -s -H "Authorization: Bearer $ANALYST" -X POST {base}/v2/auth/token \\
       -d '{{"scope": ["infer:{ONNX_MODEL}"], "ttl_seconds": 300}}'            # a short-lived token
  curl -s -H "Authorization: Bearer $ADMIN" {base}/metrics | grep bastion_requests
  .venv/bin/bastion audit verify --config {build.config_path}

Serving on {base} (Ctrl-C to stop) ...
""",
        file=sys.stderr,
        flush=True,
    )
    if args.no_serve:
        return 0
    args.config, args.host, args.unsafe_no_defenses = build.config_path, None, False
    return cmd_serve(args)


def cmd_check(args: argparse.Namespace) -> int:
    from bastion.registry import ModelRegistry

    config = _config(args.config)
    registry = ModelRegistry.load([m.path for m in config.models])
    for model in registry.models():
        print(f"ok      {model.name} {model.version} {model.digest}")
    for path, reason in registry.failures.items():
        print(f"REFUSED {path}: {reason}")
    return 1 if registry.failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bastion", description="A secure model server.")
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
        type=int,
        default=1024,
        help="requests in flight before new ones get 503 (load shedding)",
    )
    serve.add_argument(
        "--unsafe-no-defenses",
        action="store_true",
        help="benchmark baseline only: no auth, limits, guard or audit",
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
    create.add_argument("--expires-in", type=int, metavar="SECONDS")
    create.set_defaults(func=cmd_keys_create)
    with_config(keys.add_parser("list", help="list keys (never their secrets)")).set_defaults(
        func=cmd_keys_list
    )
    revoke = with_config(keys.add_parser("revoke", help="revoke a key; effective on the next request"))
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_keys_revoke)

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

    demo = sub.add_parser("demo", help="build a demo deployment and serve it")
    demo.add_argument("--dir", type=Path, default=Path("demo"))
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--no-serve", action="store_true")
    demo.add_argument("--log-level", default="info")
    demo.add_argument("--max-concurrency", type=int, default=1024)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
