"""The leakage guard's cost on a real model, in process, side by side: time to first token and tokens/s.

    .venv/bin/python bench/llm_cost.py [--requests 24] [--max-tokens 96] [--prompt bank]

Two `LocalChatBackend`s (SmolLM2-135M, one thread each), one per side, behind one protected prompt
of bench/llm/prompts.
Two sides, interleaved per request (the order alternates): "guard" runs as `Generate` does (the
prompt with the model's current canary, one per window, and every delta through the guard's stream
scanner before it counts as released); "none" sends the prompt as written and counts deltas as they
come. Time to first token is to the first released text; tokens/s is completion tokens over the time
from the request to the last released text. Benign requests from bench/llm/benign.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

from bastion.config import ProtectedPromptSettings
from bastion.llm.leakage import LeakageGuard, LeakDetected, Revealed
from bastion.llm.local import LocalChatBackend
from bastion.llm.models import load_prompt
from bastion.llm.types import ChatMessage, GenerationParams, StreamEnd

HERE = Path(__file__).resolve().parent / "llm"


async def one(
    backend: LocalChatBackend,
    system: str,
    question: str,
    guard: LeakageGuard | None,
    canary: str,
    max_tokens: int,
) -> tuple[float, float, float] | None:
    """(ms to the first released text, tokens/s to the last, ms from the model's first delta to the
    first released text: the hold-back); None if the guard refused the answer (the model recited a
    protected piece: the pair is left out of both sides)."""
    started = time.perf_counter()
    scanner = guard.stream(canary, revealed=Revealed()) if guard is not None else None
    first = last = arrived = None
    tokens = 0
    async for item in backend.stream(
        [ChatMessage("system", system), ChatMessage("user", question)],
        GenerationParams(max_tokens=max_tokens),
    ):
        if isinstance(item, StreamEnd):
            tokens = item.usage.completion_tokens
            break
        arrived = arrived if arrived is not None else time.perf_counter()
        try:
            released = scanner.feed(item) if scanner is not None else item
        except LeakDetected:
            return None
        if released:
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
    try:
        rest = scanner.finish() if scanner is not None else ""
    except LeakDetected:
        return None
    if rest:
        last = time.perf_counter()
        first = first if first is not None else last
    assert first is not None and last is not None and arrived is not None
    return (first - started) * 1000, tokens / max(last - started, 1e-9), (first - arrived) * 1000


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--prompt", default="bank")
    args = ap.parse_args()
    spec = tomllib.loads((HERE / "prompts" / f"{args.prompt}.toml").read_text())
    work = Path(tempfile.mkdtemp(prefix="bastion-llm-cost-"))
    (work / "prompt.txt").write_text(spec["text"])
    prompt = load_prompt(
        args.prompt, ProtectedPromptSettings(file=work / "prompt.txt", secrets=spec["secrets"]), work
    )
    guard = LeakageGuard(prompt)
    system, canary = guard.plant_canary()  # one per window, as ChatModel.system_prompt does
    benign = [json.loads(line) for line in (HERE / "benign.jsonl").read_text().splitlines() if line.strip()]
    questions = [b["messages"][-1]["content"] for b in benign[:: max(1, len(benign) // args.requests)]][
        : args.requests
    ]
    # One model instance per side, as each served model has its own: llama.cpp keeps the last prompt
    # of its one slot in cache, and sides sharing a slot would each evict the other's.
    backends = {"guard": LocalChatBackend(), "none": LocalChatBackend()}
    sides: dict[str, list[tuple[float, float, float]]] = {"guard": [], "none": []}
    refused = 0
    try:
        for side in ("guard", "none"):  # warm: each side's prompt cached once
            await one(
                backends[side],
                system if side == "guard" else prompt.text,
                "Hello.",
                guard if side == "guard" else None,
                canary,
                8,
            )
        for i, question in enumerate(questions):
            order = ("guard", "none") if i % 2 == 0 else ("none", "guard")
            pair = {}
            for side in order:
                pair[side] = await one(
                    backends[side],
                    system if side == "guard" else prompt.text,
                    question,
                    guard if side == "guard" else None,
                    canary,
                    args.max_tokens,
                )
            g, n = pair["guard"], pair["none"]
            if g is None or n is None:
                refused += 1
                continue
            sides["guard"].append(g)
            sides["none"].append(n)
    finally:
        for backend in backends.values():
            await backend.aclose()
    ttft = {k: statistics.median(r[0] for r in v) for k, v in sides.items()}
    tps = {k: statistics.median(r[1] for r in v) for k, v in sides.items()}
    diffs = [g[0] - n[0] for g, n in zip(sides["guard"], sides["none"], strict=True)]
    holds = sorted(r[2] for r in sides["guard"])
    print(
        f"{len(questions)} requests x 2 sides, interleaved; max_tokens {args.max_tokens}; prompt {args.prompt};"
        f" {refused} refused by the guard (the model recited a protected piece), left out"
    )
    print("| median | guard | none | guard vs none |")
    print("|---|---|---|---|")
    diff = statistics.median(diffs)
    print(
        f"| time to first token (ms) | {ttft['guard']:.0f} | {ttft['none']:.0f} | {diff:+.0f} ms (per request) |"
    )
    print(
        f"| tokens/s to the last token | {tps['guard']:.1f} | {tps['none']:.1f} | {tps['guard'] / tps['none']:.3f} |"
    )
    p90 = holds[min(len(holds) - 1, int(0.9 * len(holds)))]
    print(
        f"hold-back (the model's first delta to the guard's first release, same request): "
        f"median {statistics.median(holds):.1f} ms, p90 {p90:.1f} ms"
    )

if __name__ == "__main__":
    asyncio.run(main())
