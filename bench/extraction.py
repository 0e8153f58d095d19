"""Model extraction against the running server, with query auditing on (quarantine) and off.

A thief holding a few real rows (seeds) asks the demo classifier about new rows built from them,
one row a request, with label-only answers (the default output), and trains a surrogate on what
it was told. With query auditing on, the thief is cut off when its key is quarantined; with it
off, it gets every answer. A genuine client replays the real data (every row twice) against the
watched server to count false alarms. Every query goes over HTTP to a real server.

    .venv/bin/python bench/extraction.py [--queries 1000] [--seeds 10]

Prints, per attack: answers received before the quarantine, and the surrogate's fidelity
(agreement with the served model on real rows the thief never saw) with and without auditing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import free_port, start

from bastion.demo import build_demo, infer_request

ROLES = """
[roles.client]
rate = 1000000
burst = 1000000
daily_quota = 1000000000
grants = [ { models = ["breast-cancer"], actions = ["infer"], output = "label" } ]
"""

Attack = Callable[[np.ndarray, np.ndarray, np.random.Generator, int], np.ndarray]


def perturb(step: float) -> Attack:
    def attack(seeds: np.ndarray, data: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
        signs = np.sign(rng.standard_normal((n, data.shape[1])))
        return seeds[np.arange(n) % len(seeds)] + step * data.std(axis=0) * signs

    return attack


def interpolate(seeds: np.ndarray, data: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    pairs = np.array([rng.choice(len(seeds), 2, replace=False) for _ in range(n)])
    mix = rng.random((n, 1))
    return mix * seeds[pairs[:, 0]] + (1 - mix) * seeds[pairs[:, 1]]


def sweep(seeds: np.ndarray, data: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    low, high = data.min(axis=0), data.max(axis=0)
    rows = np.repeat(seeds[:1], n, axis=0)
    for i in range(n):
        column = i % data.shape[1]
        rows[i, column] = low[column] + (high[column] - low[column]) * ((i // data.shape[1]) % 10) / 9
    return rows


def synthetic(seeds: np.ndarray, data: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(data.min(axis=0), data.max(axis=0), (n, data.shape[1]))


ATTACKS: dict[str, Attack] = {
    "perturb seeds +-5% sd": perturb(0.05),
    "perturb seeds +-30% sd": perturb(0.3),
    "interpolate seeds": interpolate,
    "sweep features": sweep,
    "uniform synthetic": synthetic,
}


def new_key(config: Path) -> str:
    command = ["keys", "create", "--config", str(config), "--name", "client", "--role", "client"]
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", *command],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def ask(client: httpx.Client, rows: np.ndarray) -> tuple[list[str | None], int | None]:
    """One request a row: the label, or None where refused (422), and the number of the request
    that was refused as quarantined (403), or None if none was."""
    labels: list[str | None] = []
    for row in rows:
        r = client.post("/v2/models/breast-cancer/infer", json=infer_request(row[None].astype(np.float32)))
        if r.status_code == 403:
            return labels, len(labels) + 1
        labels.append(r.json()["outputs"][0]["data"][0] if r.status_code == 200 else None)
    return labels, None


def fidelity(queries: np.ndarray, labels: list[str | None], test: np.ndarray, truth: list[str]) -> float:
    answered = [i for i, label in enumerate(labels) if label is not None]
    if len({labels[i] for i in answered}) < 2:
        return float(np.mean([t == (labels[answered[0]] if answered else None) for t in truth]))
    surrogate = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    surrogate.fit(queries[answered], [labels[i] for i in answered])
    return float(np.mean(surrogate.predict(test) == np.array(truth)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bastion-extraction-"))
    build = build_demo(work / "demo")
    data = build.features.astype(np.float64)
    order = np.random.default_rng(0).permutation(len(data))
    seeds, test = data[order[: args.seeds]], data[order[args.seeds :]]
    text = build.config_path.read_text() + ROLES
    configs = {"on": build.config_path, "off": build.config_path.with_name("off.toml")}
    configs["on"].write_text(text)
    configs["off"].write_text(
        text.replace('state_dir = "state"', 'state_dir = "state-off"').replace(
            'trusted_keys = ["keys/release.pub"]\n',
            'trusted_keys = ["keys/release.pub"]\nextraction_watch = "off"\n',
        )
    )
    results: dict[str, dict[str, tuple[int, float, int | None]]] = {}
    false_alarms, seeds_only = 0, 0.0
    for mode, config in configs.items():
        port = free_port()
        server = start(config, port)
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {new_key(config)}"}) as c:
                truth = [str(label) for label in ask(c, test)[0]]
                seeds_only = fidelity(seeds, ask(c, seeds)[0], test, truth)
            if mode == "on":  # a genuine client: every real row, in random order, each sent twice
                replay = np.repeat(data[np.random.default_rng(1).permutation(len(data))], 2, axis=0)
                with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {new_key(config)}"}) as c:
                    false_alarms = int(ask(c, replay)[1] is not None)
            for name, attack in ATTACKS.items():
                # The thief asks about its seeds first, then about the rows it builds from them.
                queries = np.vstack([seeds, attack(seeds, data, np.random.default_rng(2), args.queries)])
                with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {new_key(config)}"}) as c:
                    labels, stopped = ask(c, queries)
                answered = sum(label is not None for label in labels)
                surrogate = fidelity(queries[: len(labels)], labels, test, truth)
                results.setdefault(name, {})[mode] = (answered, surrogate, stopped)
        finally:
            server.terminate()
            server.wait()
    print(f"seeds {args.seeds}, up to {args.queries} queries per attack, label-only answers, demo classifier")
    print(
        f"genuine client replaying {2 * len(data)} real rows: {'quarantined' if false_alarms else 'served'}"
    )
    print(f"surrogate from the {args.seeds} seeds' own labels alone: fidelity {seeds_only:.3f}\n")
    print(
        f"{'attack':<24}{'quarantined at':>15}{'answers (on)':>14}{'fidelity (on)':>15}"
        f"{'answers (off)':>15}{'fidelity (off)':>16}"
    )
    for name, by_mode in results.items():
        (on_n, on_f, stopped), (off_n, off_f, _) = by_mode["on"], by_mode["off"]
        at = f"query {stopped}" if stopped is not None else "never"
        print(f"{name:<24}{at:>15}{on_n:>14}{on_f:>15.3f}{off_n:>15}{off_f:>16.3f}")


if __name__ == "__main__":
    main()
