"""`bastion redteam run`: membership inference, extraction and evasion probing against a running
server in one run, written as JSON and a self-contained HTML report; thresholds set the exit code
(0 passed, 1 a threshold passed, 2 the run could not be made). The attacks: `bastion.redteam_probe`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_run_parser(redteam_sub: Any) -> None:
    """Add `run` to `bastion redteam`'s subcommands (an argparse subparsers action)."""
    run = redteam_sub.add_parser(
        "run",
        help="extraction, evasion probing and membership inference over the V2 API; writes redteam.json "
        "and redteam.html; exit 1 if a threshold is passed",
    )
    run.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    run.add_argument("--model", required=True)
    run.add_argument(
        "--data", type=Path, required=True, help=".npz with x: public rows the attacker holds (labels unused)"
    )
    run.add_argument("--members", type=Path, help=".npz with x and y: rows the model trained on")
    run.add_argument("--nonmembers", type=Path, help=".npz with x and y: rows it never saw")
    run.add_argument(
        "--key-env",
        default="BASTION_KEY",
        help="variable holding the key for membership inference and for labelling the attacker's rows",
    )
    run.add_argument("--extraction-key-env", help="variable holding the thief's key (default: --key-env's)")
    run.add_argument("--evasion-key-env", help="variable holding the evader's key (default: --key-env's)")
    run.add_argument("--extraction-queries", type=int, default=400, help="rows the thief may send")
    run.add_argument("--evasion-queries", type=int, default=400, help="rows the evasion probe may send")
    run.add_argument("--seeds", type=int, default=10, help="attacker's rows the thief starts from")
    run.add_argument("--holdout", type=int, default=150, help="attacker's rows fidelity is measured on")
    run.add_argument("--thief", choices=["tree", "logistic"], default="tree")
    run.add_argument("--epsilon", type=float, default=0.25, help="evasion success: RMS distance in std")
    run.add_argument("--batch", type=int, default=16, help="rows per request of the attacks")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, default=Path("redteam"), help="directory for redteam.json and .html")
    run.add_argument("--max-fidelity", type=float)
    run.add_argument("--max-auc", type=float)
    run.add_argument("--max-evasion-success", type=float)
    run.add_argument(
        "--require-containment", action="store_true", help="fail unless extraction and evasion were contained"
    )
    run.set_defaults(func=cmd_redteam_run)


def _fail(message: str) -> int:
    print(f"bastion: {message}", file=sys.stderr)
    return 2


def _bars(phase: str, total: int) -> Any:
    """A tqdm bar on stderr, only when stdout is a terminal (a pipeline's log stays clean)."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    return tqdm(total=total, desc=phase, unit="row", disable=not sys.stdout.isatty(), leave=True)


def _npz(path: Path, flag: str, *, labels: bool) -> tuple[Any, Any]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["x"]), (np.asarray(data["y"]) if labels else None)
    except (OSError, KeyError, ValueError) as e:
        wanted = "'x' and 'y'" if labels else "'x'"
        raise ValueError(f"{flag} {path}: needs arrays {wanted} in an .npz: {e}") from None


def cmd_redteam_run(args: argparse.Namespace) -> int:
    keys = {}
    for flag, name in (
        ("--key-env", args.key_env),
        ("--extraction-key-env", args.extraction_key_env or args.key_env),
        ("--evasion-key-env", args.evasion_key_env or args.key_env),
    ):
        value = os.environ.get(name)
        if not value:
            return _fail(f"{flag}: set {name} to the API key or token to attack with")
        keys[flag] = value
    if (args.members is None) != (args.nonmembers is None):
        return _fail("--members and --nonmembers go together")
    try:
        from bastion.redteam import RemoteError
        from bastion.redteam_html import render
        from bastion.redteam_probe import RunGate, RunPlan, run_redteam
    except ImportError as e:
        return _fail(f"the red-team harness needs its extra ({e.name}): pip install 'bastion-serve[redteam]'")
    try:
        rows, _ = _npz(args.data, "--data", labels=False)
        members = _npz(args.members, "--members", labels=True) if args.members else None
        nonmembers = _npz(args.nonmembers, "--nonmembers", labels=True) if args.nonmembers else None
        plan = RunPlan(
            url=args.url,
            model=args.model,
            key=keys["--key-env"],
            extraction_key=keys["--extraction-key-env"],
            evasion_key=keys["--evasion-key-env"],
            attacker_rows=rows,
            members=members,
            nonmembers=nonmembers,
            seeds=args.seeds,
            holdout=args.holdout,
            extraction_queries=args.extraction_queries,
            evasion_queries=args.evasion_queries,
            batch=args.batch,
            thief=args.thief,
            epsilon=args.epsilon,
            seed=args.seed,
            gate=RunGate(
                max_fidelity=args.max_fidelity,
                max_auc=args.max_auc,
                max_evasion_success=args.max_evasion_success,
                require_containment=args.require_containment,
            ),
        )
        result = run_redteam(plan, _bars)
    except (RemoteError, ValueError) as e:
        return _fail(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "redteam.json").write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    (args.out / "redteam.html").write_text(render(result), encoding="utf-8")
    ex, ev, mi = result.extraction, result.evasion, result.membership

    def contained(at: int | None) -> str:
        return "never contained" if at is None else f"contained at {at} rows"

    if ex is not None:
        fidelity = "-" if ex.fidelity is None else f"{ex.fidelity:.3f}"
        print(f"extraction: fidelity {fidelity} after {ex.queries} rows, {contained(ex.contained_at)}")
    if mi is not None:
        auc = "-" if mi.auc is None else f"{mi.auc:.3f}"
        print(f"membership: AUC {auc} after {mi.queries} rows, {contained(mi.contained_at)}")
    if ev is not None:
        print(f"evasion: success {ev.success_rate:.2f} after {ev.queries} rows, {contained(ev.contained_at)}")
    print(f"report: {args.out / 'redteam.html'} (JSON: {args.out / 'redteam.json'})")
    if result.failures:
        print(f"bastion: red-team gate failed: {'; '.join(result.failures)}", file=sys.stderr)
        return 1
    return 0
