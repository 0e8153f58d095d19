"""PII and secrets redaction: import time, first call, per-call latency, precision and recall.

Import time and the first call are measured in a fresh interpreter (what a server pays at start-up);
latency is the median and p95 of `Redactor.redact` on a short (~200 characters) and a long
(~4 KB) text, with everything on and with PII or secrets alone; precision and recall per type are
read from the labelled cases in bench/llm/redaction_cases.jsonl (a labelled value counts as found
when it is gone from the output and a placeholder of its type stands in the text).

    .venv/bin/python bench/redaction.py [--rounds 200] [--show-misses]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from bastion.llm.redaction import ENTITIES, SECRET, Redactor  # noqa: E402

CASES = ROOT / "bench" / "llm" / "redaction_cases.jsonl"

SHORT = (
    "Hi team, please forward the invoice to maria.garcia@example.org and cc me; my number is "
    "+44 20 7946 0958. The order 88231 shipped on 2024-03-02 (v2.4.1), card 4111 1111 1111 1111. Thanks!"
)
# About 4 KB of ordinary prose and code with a few findings spread through it.
_PARAGRAPH = (
    "The deployment guide explains how to configure the service, rotate logs every 7 days and keep "
    "at most 30 archives. Version 3.11.7 fixed the timeout (see request 550e8400-e29b-41d4-a716-"
    "446655440000). On 2024-05-01 the team moved the build to 10.0.19045.3803 and the release notes "
    "list 12 changes, order #123456789 among them.\n"
)
LONG = (
    _PARAGRAPH * 4
    + "Contact ops@acme.com or call (212) 555-0143 if the host 203.0.113.7 stops answering.\n"
    + _PARAGRAPH * 4
    + 'settings = {"retries": 5, "password": "Zq8mK2vR9xL4"}\n'
    + _PARAGRAPH * 4
)

_IMPORT_PROBE = """
import time
t0 = time.perf_counter()
from bastion.llm.redaction import Redactor
t1 = time.perf_counter()
r = Redactor()
t2 = time.perf_counter()
r.redact({short!r})
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def startup(runs: int) -> list[tuple[float, float, float]]:
    out = []
    for _ in range(runs):
        probe = _IMPORT_PROBE.format(short=SHORT)
        done = subprocess.run(
            [sys.executable, "-c", probe],
            check=True,
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        )
        a, b, c = (float(x) for x in done.stdout.split())
        out.append((a, b, c))
    return out


def latency(redactor: Redactor, text: str, rounds: int) -> tuple[float, float]:
    for _ in range(10):
        redactor.redact(text)
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        redactor.redact(text)
        samples.append(time.perf_counter() - t)
    samples.sort()
    return statistics.median(samples) * 1e3, samples[int(0.95 * len(samples))] * 1e3


def quality(redactor: Redactor, show_misses: bool) -> dict[str, tuple[int, int, int]]:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for line in CASES.read_text().splitlines():
        case = json.loads(line)
        out = redactor.redact(case["text"])
        removed: Counter[str] = Counter()
        labelled: Counter[str] = Counter()
        for kind, value in case["labels"]:
            labelled[kind] += 1
            if value not in out.text:
                removed[kind] += 1
        for kind in set(labelled) | set(out.counts):
            hit = min(removed[kind], out.counts.get(kind, 0))
            tp[kind] += hit
            fp[kind] += out.counts.get(kind, 0) - hit
            fn[kind] += labelled[kind] - hit
            if show_misses and (out.counts.get(kind, 0) != hit or labelled[kind] != hit):
                # The bench prints its own labelled cases, never traffic.
                print(f"  {case['id']} {kind}: labelled {labelled[kind]}, placed {out.counts.get(kind, 0)}")
                print(f"    in:  {case['text']!r}\n    out: {out.text!r}")
    return {k: (tp[k], fp[k], fn[k]) for k in sorted(set(tp) | set(fp) | set(fn))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--startups", type=int, default=3)
    parser.add_argument("--show-misses", action="store_true")
    args = parser.parse_args()

    runs = startup(args.startups)
    med = [statistics.median(col) * 1e3 for col in zip(*runs, strict=True)]
    print(f"start-up (fresh interpreter, median of {args.startups}): import {med[0]:.0f} ms, "
          f"Redactor() {med[1]:.0f} ms, first redact {med[2]:.1f} ms")

    print(f"\nlatency, median / p95 of {args.rounds} calls (ms); short {len(SHORT)} chars, long {len(LONG)}")
    for label, redactor in (
        ("all (6 PII types + secrets)", Redactor()),
        ("PII only", Redactor(secrets=False)),
        ("secrets only", Redactor(entities=(), secrets=True)),
    ):
        s = latency(redactor, SHORT, args.rounds)
        long_ = latency(redactor, LONG, max(20, args.rounds // 5))
        print(f"  {label:28s} short {s[0]:6.2f} / {s[1]:6.2f}   long {long_[0]:6.2f} / {long_[1]:6.2f}")

    cases = CASES.read_text().splitlines()
    negatives = sum(1 for c in cases if not json.loads(c)["labels"])
    print(f"\nprecision / recall on {len(cases)} labelled cases ({negatives} with nothing to find)")
    table = quality(Redactor(), args.show_misses)
    all_tp = all_fp = all_fn = 0
    for kind in [*sorted(ENTITIES), SECRET]:
        tp, fp, fn = table.get(kind, (0, 0, 0))
        all_tp, all_fp, all_fn = all_tp + tp, all_fp + fp, all_fn + fn
        p = tp / (tp + fp) if tp + fp else float("nan")
        r = tp / (tp + fn) if tp + fn else float("nan")
        print(f"  {kind:13s} tp {tp:3d} fp {fp:3d} fn {fn:3d}  precision {p:.2f}  recall {r:.2f}")
    print(f"  {'all':13s} tp {all_tp:3d} fp {all_fp:3d} fn {all_fn:3d}  "
          f"precision {all_tp / (all_tp + all_fp):.2f}  recall {all_tp / (all_tp + all_fn):.2f}")


if __name__ == "__main__":
    main()
