"""The long fuzz run: tests/e2e/test_fuzz.py with many more generated requests per principal.

`make test` sends a few hundred requests per principal; this sends `--examples` per principal (five
principals) against a fresh real server and prints the time and the status counts per principal.
A failure prints the request that caused it (curl) and the Hypothesis seed to replay it.

    .venv/bin/python bench/fuzz.py [--examples 5000] [--seed N] [-k admin]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=5000, help="requests per principal (default 5000)")
    parser.add_argument("--seed", type=int, help="Hypothesis seed, to replay a run")
    parser.add_argument("-k", dest="select", help="pytest -k expression, e.g. 'admin or token'")
    args = parser.parse_args()
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "e2e" / "test_fuzz.py"),
    ]
    if args.seed is not None:
        command.append(f"--hypothesis-seed={args.seed}")
    if args.select:
        command += ["-k", args.select]
    env = {**os.environ, "BASTION_FUZZ_EXAMPLES": str(args.examples)}
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=env, check=False)
    print(f"\nfuzz: {args.examples} requests per principal, {time.monotonic() - started:.0f} s wall")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
