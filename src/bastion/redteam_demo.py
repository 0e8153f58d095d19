"""The red-team report of the demo: `python -m bastion.redteam_demo --out artifacts/redteam`.

Builds the demo deployment (`bastion demo`'s models, policy and roles; the language model left out,
the attack does not need it) into a directory, adds one classifier whose membership can be measured,
serves it on a free loopback port, attacks it through `bastion redteam run` with analysts' keys
(label-only answers, query auditing on), and writes `redteam.json` and `redteam.html`.

The added model, `breast-cancer-holdout`, is the demo's own pipeline (standard scaler, logistic
regression) trained on a stratified half of scikit-learn's breast-cancer rows: the other half are
non-members, which the demo's classifier (trained on every row) does not have. Its signed reference
data are the whole dataset, as the demo classifier's are, so query auditing and the
out-of-distribution screen watch it as they watch the demo's classifier.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL = "breast-cancer-holdout"


@dataclass(frozen=True)
class Target:
    config: Path
    members: tuple[np.ndarray, np.ndarray]  # (rows (n, 30) float32, class indices (n,))
    nonmembers: tuple[np.ndarray, np.ndarray]


def build_target(root: Path, *, port: int = 0) -> Target:
    """The demo in `root` (wiped first if it holds an earlier demo) plus `breast-cancer-holdout`.
    Raises FileExistsError if `root` is a non-empty directory that is not a demo."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bastion.demo import build_demo, feature_spec, write_onnx_model

    build = build_demo(root, port=port, llm=False)
    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    mx, nx, my, ny = train_test_split(x, data.target, test_size=0.5, random_state=0, stratify=data.target)
    estimator = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    estimator.fit(mx, my)
    write_onnx_model(
        root / "models" / MODEL, estimator, feature_spec(x), [str(c) for c in data.target_names], MODEL
    )
    # Reference data: every row, as the demo's classifier has. With its training half only, the
    # screen refuses a few genuine non-members as out of distribution, and query auditing, counting
    # those refusals, quarantines a genuine client that sends them all (measured: the membership key).
    build.publish(root / "models" / MODEL, reference=x)
    text = build.config_path.read_text()
    grant = 'models = ["breast-cancer", "breast-cancer-skops"]'
    at = text.index("# Analysts may ask")
    assert grant in text  # the demo's analyst grant, extended to the added model
    added = f'[[models]]\npath = "bundles/{MODEL}-1"\ntrusted_keys = ["keys/release.pub"]\n\n'
    text = text[:at] + added + text[at:].replace(grant, f'models = ["breast-cancer", "breast-cancer-skops", "{MODEL}"]')
    build.config_path.write_text(text)
    return Target(build.config_path, (mx, my), (nx, ny))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """Build, serve, attack, stop. Exit status: `bastion redteam run`'s (0 passed, 1 gate failed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("artifacts/redteam-demo"), help="the demo deployment")
    parser.add_argument("--out", type=Path, default=Path("artifacts/redteam"), help="redteam.json and .html")
    parser.add_argument("--extraction-queries", type=int, default=400)
    parser.add_argument("--evasion-queries", type=int, default=400)
    parser.add_argument("--max-fidelity", type=float, default=0.95)
    parser.add_argument("--max-auc", type=float, default=0.6)
    args = parser.parse_args(argv)
    from bastion.keys import KeyStore
    from bastion.statedir import StatePaths

    port = _free_port()
    target = build_target(args.dir, port=port)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "attacker-rows.npz"
    members, nonmembers = args.out / "members.npz", args.out / "nonmembers.npz"
    # The attacker's public rows: non-members only (rows the model never saw, as an outsider has).
    np.savez(data, x=target.nonmembers[0])
    np.savez(members, x=target.members[0], y=target.members[1])
    np.savez(nonmembers, x=target.nonmembers[0], y=target.nonmembers[1])
    from bastion.config import load_config

    store = KeyStore(StatePaths(load_config(target.config).server.state_dir).keys)
    env = dict(os.environ)
    for name in ("BASTION_KEY", "BASTION_EXTRACTION_KEY", "BASTION_EVASION_KEY"):
        env[name] = store.create(name=f"redteam-{name.lower()}", roles=["analyst"], now=time.time()).secret
    store.close()
    bastion = [sys.executable, "-m", "bastion.cli"]
    log = (args.out / "server.log").open("wb")
    server = subprocess.Popen([*bastion, "serve", "--config", str(target.config)], stdout=log, stderr=log)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", server)
        command = [*bastion, "redteam", "run", "--url", f"http://127.0.0.1:{port}", "--model", MODEL]
        command += ["--data", str(data), "--members", str(members), "--nonmembers", str(nonmembers)]
        command += ["--extraction-key-env", "BASTION_EXTRACTION_KEY", "--evasion-key-env", "BASTION_EVASION_KEY"]
        command += ["--extraction-queries", str(args.extraction_queries)]
        command += ["--evasion-queries", str(args.evasion_queries), "--out", str(args.out)]
        command += ["--max-fidelity", str(args.max_fidelity), "--max-auc", str(args.max_auc)]
        return subprocess.run(command, env=env, check=False).returncode
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _wait_ready(base: str, server: subprocess.Popen[bytes]) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("bastion serve exited: see server.log")
        try:
            with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1):  # noqa: S310 (loopback)
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise SystemExit("bastion serve did not become ready in 60 s")


if __name__ == "__main__":
    sys.exit(main())
