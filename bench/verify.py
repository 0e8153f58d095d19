"""Bundle verification against `sha256sum` on the same files, side by side in one run.

Builds a signed bundle holding the demo ONNX model plus a data file of --size MiB
(random bytes, as incompressible as weights), then alternates: `sha256sum` over
every file of the bundle, and Bastion's full verification (signature, every
digest, environment lock, load, golden samples). Both read from the page cache
after the first round. Prints the median times and their ratio.

    .venv/bin/python bench/verify.py [--size 1024] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bastion.bundle.pack import pack  # noqa: E402
from bastion.bundle.signing import generate_signing_key, sign_bundle  # noqa: E402
from bastion.bundle.verify import TrustPolicy, verify_bundle  # noqa: E402
from bastion.demo import build_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024, help="MiB of data in the bundle")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bastion-verify-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        demo = build_demo(work / "demo")
        model = work / "model"
        shutil.copytree(demo.root / "models" / "breast-cancer", model)
        with (model / "weights.bin").open("wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1 << 20))
        key = work / "k.key"
        pub = generate_signing_key(key, b"benchmark passphrase")
        bundle = work / "bundle"
        pack(model, bundle, progress=False)
        sign_bundle(bundle, key, b"benchmark passphrase")
        files = sorted(str(p) for p in bundle.iterdir() if p.is_file())
        size = sum(os.path.getsize(f) for f in files) / 2**20
        policy = TrustPolicy(trusted_keys=[pub])
        times: dict[str, list[float]] = {"sha256sum": [], "openssl dgst": [], "bastion verify": []}
        for rnd in range(args.rounds + 1):  # round 0 warms the page cache and is not counted
            t = time.perf_counter()
            subprocess.run(["sha256sum", *files], check=True, stdout=subprocess.DEVNULL)
            a = time.perf_counter() - t
            # OpenSSL uses the CPU's SHA extensions where coreutils may not: the fairer yardstick.
            t = time.perf_counter()
            subprocess.run(["openssl", "dgst", "-sha256", *files], check=True, stdout=subprocess.DEVNULL)
            o = time.perf_counter() - t
            t = time.perf_counter()
            verify_bundle(bundle, policy, progress=False)
            b = time.perf_counter() - t
            if rnd:
                times["sha256sum"].append(a)
                times["openssl dgst"].append(o)
                times["bastion verify"].append(b)
                print(
                    f"round {rnd}: sha256sum {a:6.2f} s   openssl dgst {o:6.2f} s   bastion verify {b:6.2f} s",
                    flush=True,
                )
        base = statistics.median(times["sha256sum"])
        ours = statistics.median(times["bastion verify"])
        print(
            f"\nbundle: {len(files)} files, {size:,.0f} MiB; median of {args.rounds} rounds (warm page cache)"
        )
        ossl = statistics.median(times["openssl dgst"])
        print(f"sha256sum       {base:6.2f} s  ({size / base:,.0f} MiB/s)")
        print(f"openssl dgst    {ossl:6.2f} s  ({size / ossl:,.0f} MiB/s)")
        print(f"bastion verify  {ours:6.2f} s  ({size / ours:,.0f} MiB/s)")
        print(
            f"ratio           {ours / base:6.2f}x of sha256sum (target <= 1.5x), {ours / ossl:.2f}x of openssl"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
