"""False refusals of the leakage guard on the REAL model's benign answers, in process (no server).

    .venv/bin/python bench/llm_benign_real.py --save /tmp/benign_real.json    # generate, then grade
    .venv/bin/python bench/llm_benign_real.py --replay /tmp/benign_real.json  # grade saved answers
    .venv/bin/python bench/llm_benign_real.py --replay /tmp/a.json /tmp/b.json  # two passes, one ledger
    git show REV:src/bastion/llm/leakage.py > /tmp/old.py    # grade them with another version
    .venv/bin/python bench/llm_benign_real.py --replay /tmp/benign_real.json --leakage-py /tmp/old.py

The 220 requests of bench/llm/benign.jsonl go to SmolLM2-135M (`LocalChatBackend`, greedy,
max_tokens 96, one thread) behind the bank prompt (bench/llm/prompts/bank.toml) with a canary
planted per request (`guard.plant_canary()`), as `bastion.stages.chat` sends them; each whole
answer is checked with `guard.check(answer, canary, revealed=ledger)`, one `Revealed` ledger for
the whole set (one principal sending everything). Refusals are counted by detector and each is
graded by the independent oracle of bench/llm_guard.py (`leaks`: a secret present after decoding,
or the prompt recited): a refusal of an answer the oracle calls a leak is a true one (the small
model does recite its vault code and IBAN), and so is a refusal of an answer that holds the
request's canary (the model copied the prompt's last line); the others are false refusals.

The model's answer does not depend on the guard, so `--save` keeps (answer, canary) per request and
`--replay` grades the same answers with the guard as it is now: before/after on identical text.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from llm_guard import leaks, load_set  # the oracle, independent of the guard

from bastion.llm import leakage
from bastion.llm.leakage import LeakageGuard
from bastion.llm.types import ChatMessage, GenerationParams, ProtectedPrompt

HERE = Path(__file__).parent / "llm"


def _alnum(s: str) -> str:
    return "".join(c for c in s.lower() if c.isalnum())


def bank_prompt() -> ProtectedPrompt:
    import tomllib

    d = tomllib.loads((HERE / "prompts" / "bank.toml").read_text())
    return ProtectedPrompt(d["name"], d["text"], "sha256:bank", tuple(d["secrets"]))


async def generate(
    prompt: ProtectedPrompt, guard: LeakageGuard, cases: list[dict[str, Any]]
) -> list[dict[str, str]]:
    from bastion.llm.local import LocalChatBackend

    backend = LocalChatBackend(n_threads=1)
    out = []
    try:
        for i, case in enumerate(cases):
            system, canary = guard.plant_canary()
            messages = [ChatMessage("system", system)] + [
                ChatMessage(m["role"], m["content"]) for m in case["messages"]
            ]
            done = await backend.complete(messages, GenerationParams(max_tokens=96))
            out.append({"id": case["id"], "canary": canary, "answer": done.text})
            if (i + 1) % 20 == 0:
                print(f"  {i + 1}/{len(cases)}", file=sys.stderr, flush=True)
    finally:
        await backend.aclose()
    return out


def grade(
    prompt: ProtectedPrompt, guard: LeakageGuard, answers: list[dict[str, str]], *, detail: bool, mod: Any = leakage
) -> dict[str, Any]:
    """Refusals by detector, each graded by the oracle; `mod` is the leakage module `guard` is from."""
    ledger = mod.Revealed()
    by: Counter[str] = Counter()
    true_: Counter[str] = Counter()
    false_: Counter[str] = Counter()
    oracle_leaks = 0
    for a in answers:
        leak = leaks(a["answer"], prompt) or _alnum(a["canary"]) in _alnum(a["answer"])
        oracle_leaks += leak
        try:
            guard.check(a["answer"], a["canary"], revealed=ledger)
        except mod.LeakDetected as e:
            by[e.detector] += 1
            (true_ if leak else false_)[e.detector] += 1
            if detail:
                # bench output on the operator's own machine: the answer is the model's, for review
                print(f"[{e.detector}] {'LEAK' if leak else 'false'} {a['id']}: {a['answer'][:160]!r}")
    fill = {
        f"secret {sid}": round(ledger.bits((guard.ledger_key, sid)).bit_count() / n, 3)
        for sid, n in enumerate(guard.secret_lengths)
    }
    return {
        "requests": len(answers),
        "ledger_fill": fill,  # share of each secret's positions the principal's ledger holds at the end
        "refused": sum(by.values()),
        "false": sum(false_.values()),
        "true": sum(true_.values()),
        "oracle_leaks": oracle_leaks,
        "by_detector": dict(by),
        "false_by_detector": dict(false_),
        "true_by_detector": dict(true_),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", type=Path, help="generate with the model and save the answers here")
    g.add_argument("--replay", type=Path, nargs="+", help="grade answers saved by --save (several: in turn)")
    ap.add_argument("--detail", action="store_true", help="print each refused answer")
    ap.add_argument("--leakage-py", type=Path, help="grade with this copy of bastion/llm/leakage.py")
    args = ap.parse_args()
    prompt = bank_prompt()
    guard = LeakageGuard(prompt)
    mod: Any = leakage
    if args.leakage_py:
        spec = importlib.util.spec_from_file_location("leakage_other", args.leakage_py)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        guard = mod.LeakageGuard(prompt)
    if args.save:
        t0 = time.perf_counter()
        answers = asyncio.run(generate(prompt, guard, load_set("benign.jsonl")))
        args.save.write_text(json.dumps(answers))
        print(f"generated {len(answers)} answers in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    else:
        answers = [a for path in args.replay for a in json.loads(path.read_text())]
    r = grade(prompt, guard, answers, detail=args.detail, mod=mod)
    n = r["requests"]
    print(
        f"refused {r['refused']}/{n} = {100 * r['refused'] / n:.1f} %; false {r['false']} "
        f"({100 * r['false'] / n:.1f} %), true {r['true']}; oracle leaks in all answers: {r['oracle_leaks']}"
    )
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
