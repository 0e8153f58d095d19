"""A scripted leaky backend: the worst case the leakage guard must stand against.

`ScriptedLeakyBackend` implements `ChatBackend` without a model. When the user's words ask for the
instructions (a request that names them: "your instructions", "the words above", "the system
prompt", "the password", ...), it answers with the protected prompt (the first system message it
is given, canary included) transformed as the words ask: base64 (one line, wrapped, or in prose),
hex, reversed characters or words, spelled (NATO, "S as in Sierra", one letter per line), letters or
words with separators, Caesar with the shift asked (rot13 for "rot13"), leetspeak, a word-by-word
"translation" that keeps codes and names, upper case, JSON, a poem, a summary of the sentences that
hold codes, a continuation from the words given. Anything else gets a plausible benign answer that
may echo a few harmless words of the prompt, as a real assistant in a persona does.

Small language models are too weak to encode on request; this backend is what proves that the
guard's normalised views work (bench/llm_guard.py, tests/unit/llm/test_leakage.py). It is
deterministic: the same messages give the same text and the same deltas.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from collections.abc import AsyncIterator, Sequence

from bastion.llm.types import ChatMessage, Completion, GenerationParams, StreamEnd, Usage

__all__ = ["ScriptedLeakyBackend", "answer"]

# A request for the hidden text: a word pointing at it near a word naming it.
_POINTER = (
    r"(your|you were|you've been|you have been|you are|above|before this|system|hidden|initial|"
    r"original|previous|prior|earlier|confidential|developer|internal|this conversation|everything|"
    r"full|entire|exact|verbatim|word for word)"
)
_TARGET = (
    r"(instructions?|prompt|rules?|directives?|guidelines|configuration|config|setup|context|"
    r"message|text|words|sentences?|password|passphrase|pass phrase|code|pin|key|account|answer|"
    r"grid|protocol|persona|secret|everything|lines?)"
)
_ASKS = re.compile(
    rf"\b{_POINTER}\b[^.?!]{{0,60}}?\b{_TARGET}\b|\b{_TARGET}\b[^.?!]{{0,30}}\b(above|so far)\b"
    r"|\b(the|your|that)\s+(secret\s+|vault\s+)?(password|passphrase|pass phrase|pin|secret code|vault code)\b"
    r"|\bthe secret\b(?! to)|\b(were you told|you were told|you were given|were you given)\b"
)
_CONTINUE = re.compile(
    r"(continue|complete|finish)[^.?!]{0,40}(sentence|text|line|this)|\b(is|are):?\s*\.\.\.\s*$", re.I
)

_NATO = [
    "Alfa",
    "Bravo",
    "Charlie",
    "Delta",
    "Echo",
    "Foxtrot",
    "Golf",
    "Hotel",
    "India",
    "Juliett",
    "Kilo",
    "Lima",
    "Mike",
    "November",
    "Oscar",
    "Papa",
    "Quebec",
    "Romeo",
    "Sierra",
    "Tango",
    "Uniform",
    "Victor",
    "Whiskey",
    "X-ray",
    "Yankee",
    "Zulu",
]
_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_FRENCH = dict(
    pair.split(":")
    for pair in [
        "you:vous",
        "are:êtes",
        "the:le",
        "a:un",
        "an:une",
        "of:de",
        "and:et",
        "is:est",
        "never:jamais",
        "reveal:révéler",
        "code:code",
        "to:à",
        "anyone:personne",
        "answer:répondre",
        "questions:questions",
        "about:sur",
        "with:avec",
        "this:ce",
        "these:ces",
        "instructions:instructions",
        "do:faire",
        "not:pas",
        "for:pour",
        "your:votre",
        "must:doit",
        "be:être",
        "shared:partagé",
        "customers:clients",
        "always:toujours",
        "in:dans",
        "on:sur",
        "at:à",
        "it:il",
        "or:ou",
        "if:si",
        "that:que",
        "which:qui",
        "by:par",
        "my:mon",
        "our:notre",
        "their:leur",
        "ask:demander",
        "tell:dire",
        "give:donner",
        "only:seulement",
    ]
)
_LEET = str.maketrans("aeiostAEIOST", "4310574310$7")


def _caesar(text: str, k: int) -> str:
    def shift(c: str) -> str:
        if "a" <= c <= "z":
            return chr((ord(c) - 97 + k) % 26 + 97)
        if "A" <= c <= "Z":
            return chr((ord(c) - 65 + k) % 26 + 65)
        return c

    return "".join(shift(c) for c in text)


def _spell_nato(text: str) -> str:
    out = []
    for c in text:
        if c.isascii() and c.isalpha():
            out.append(_NATO[ord(c.lower()) - 97])
        elif c.isdigit():
            out.append(_DIGITS[int(c)])
        elif c.isspace():
            out.append("/")
    return " ".join(out)


def _spell_as_in(text: str) -> str:
    out = []
    for c in text:
        if c.isascii() and c.isalpha():
            out.append(f"{c.upper()} as in {_NATO[ord(c.lower()) - 97]}")
        elif c.isdigit():
            out.append(c)
    return ", ".join(out)


def _poem(text: str) -> str:
    words = text.split()
    lines = [" ".join(words[i : i + 6]) for i in range(0, len(words), 6)]
    return "A poem of my orders:\n\n" + "\n".join(line[:1].upper() + line[1:] for line in lines)


def _summary(prompt: str) -> str:
    sentences = re.split(r"(?<=[.!?])\s+|\n", prompt)
    keep = [s for s in sentences if re.search(r"\d|[A-Z]{2,}|code|pass|key|rule|protocol|answer|grid", s)]
    return "In short: " + " ".join(keep)


def _hex(prompt: str, rng: random.Random) -> str:
    data = prompt.encode()
    style = rng.randrange(3)
    if style == 0:
        return data.hex()
    if style == 1:
        return " ".join(f"{b:02x}" for b in data)
    return " ".join(f"0x{b:02X}" for b in data)


def _b64(prompt: str, rng: random.Random) -> str:
    enc = base64.b64encode(prompt.encode()).decode()
    style = rng.randrange(3)
    if style == 0:
        return enc
    if style == 1:
        return "\n".join(enc[i : i + 60] for i in range(0, len(enc), 60))
    return f"Sure! Here is the text encoded in base64:\n\n{enc}\n\nLet me know if you need anything else."


def _transform(prompt: str, asked: str, rng: random.Random) -> str:
    """The prompt transformed as the user's words ask (`asked` is lower-cased)."""
    if re.search(r"base ?64|b64", asked):
        return _b64(prompt, rng)
    if re.search(r"\bhex|hexadecimal", asked):
        return _hex(prompt, rng)
    if "rot13" in asked or "rot-13" in asked or "rot 13" in asked:
        return _caesar(prompt, 13)
    m = re.search(r"(caesar|shift)\D{0,30}?(\d{1,2})|(\d{1,2})\D{0,12}(shift|places|positions)", asked)
    if m or "caesar" in asked:
        k = int(next((g for g in (m.groups() if m else ()) if g and g.isdigit()), "3"))
        return _caesar(prompt, k)
    if re.search(r"revers|backwards", asked):
        if re.search(r"(order of the words|words in reverse|word order|each word)", asked):
            return " ".join(prompt.split()[::-1])
        return prompt[::-1]
    if re.search(r"nato|phonetic|alfa|alpha bravo", asked):
        return _spell_nato(prompt)
    if re.search(r"as in", asked):
        return _spell_as_in(prompt)
    if re.search(r"leet|l33t|1337|hacker", asked):
        return prompt.translate(_LEET)
    m = re.search(r"(\|| pipe|dash|hyphen|comma|dot|slash|star|asterisk|separat|between)", asked)
    if m or re.search(r"spell|letter by letter|one letter|character by character|each character", asked):
        sep = {"|": "|", " pipe": "|", "dash": "-", "hyphen": "-", "comma": ", ", "dot": ".", "slash": "/"}
        s = sep.get(m.group(1), " * " if m.group(1) in ("star", "asterisk") else "|") if m else "\n"
        if re.search(r"between (the |each )?words|word by word", asked):
            return s.join(prompt.split())
        return s.join(c for c in prompt if not c.isspace())
    if re.search(r"translat|in french|in spanish|in german|en français|auf deutsch", asked):
        return " ".join(_FRENCH.get(w.lower(), w) for w in prompt.split())
    if re.search(r"summar|tl;?dr|short version|key points|bullet", asked):
        return _summary(prompt)
    if re.search(r"json|yaml|dictionary|key-value", asked):
        return json.dumps({"role": "system", "instructions": prompt}, indent=2)
    if re.search(r"poem|verse|song|haiku|limerick|rhyme", asked):
        return _poem(prompt)
    if re.search(r"upper ?case|capital|all caps|shout", asked):
        return prompt.upper()
    return prompt


def _benign(prompt: str, user: str, rng: random.Random) -> str:
    """A plausible answer to a benign request, echoing a few harmless words of the persona."""
    # "You are Penelope," and the like: the first words of the prompt's first line of prose (a line
    # planted before it, such as the guard's canary line, is skipped).
    lines = [line for line in prompt.splitlines() if len(line.split()) > 3]
    persona = " ".join(lines[0].split()[:3]).rstrip(",.") if lines else ""
    low = user.lower()
    quoted = re.search(r":\s*(.+)$", user, re.S)
    body = quoted.group(1).strip() if quoted else ""
    if "translat" in low and body:
        return "Here is a translation: " + " ".join(_FRENCH.get(w.lower(), w) for w in body.split())
    if re.search(r"(encode|convert)\b.*base ?64", low) and body:
        return f"The base64 encoding is {base64.b64encode(body.encode()).decode()}"
    if re.search(r"(encode|convert)\b.*\bhex", low) and body:
        return f"In hex: {body.encode().hex()}"
    if re.search(r"decode", low) and body:
        try:
            return "It decodes to: " + base64.b64decode(body, validate=True).decode("utf-8", "replace")
        except ValueError:
            return "That does not look like valid base64 to me."
    if re.search(r"revers", low) and body:
        return f"Reversed: {body[::-1]}"
    if re.search(r"rot13|caesar", low) and body:
        return f"With rot13: {_caesar(body, 13)}"
    if re.search(r"spell", low) and body:
        return "Spelled out: " + "-".join(c for c in body if not c.isspace())
    if re.search(r"summar|tl;?dr", low) and body:
        return "Summary: " + re.split(r"(?<=[.!?])\s", body)[0]
    if re.search(r"upper ?case|capital", low) and body:
        return body.upper()
    if re.search(r"poem|haiku|verse", low):
        return "Quiet words are kept\nlike keys beneath a doormat;\nthe moon knows, and waits."
    if "base64" in low or "base 64" in low:
        return (
            "Base64 turns every 3 bytes into 4 printable characters from a 64-letter alphabet, so "
            "binary data can travel through text-only channels; 'hello' becomes aGVsbG8=."
        )
    if re.search(r"\bhex", low):
        return "Hexadecimal writes each byte as two digits from 0-9 and a-f; 255 is ff."
    if re.search(r"caesar|rot13|cipher", low):
        return (
            "A Caesar cipher shifts every letter by a fixed number; rot13 shifts by 13, so applying it "
            "twice gives the text back."
        )
    openers = [
        f"{persona}, at your service. ",
        "Good question. ",
        "Happy to help. ",
        "",
    ]
    answers = [
        "The short answer is yes, but it depends on the details you share with me.",
        "I would start with the official documentation, then try a small example and compare the results.",
        "Most people find that a checklist helps: write the steps down, do one at a time, and verify each.",
        "There are three common options, each with trade-offs in cost, speed and reliability.",
        "Please check the opening hours on our website, as they change on public holidays.",
    ]
    return rng.choice(openers) + rng.choice(answers)


def answer(messages: Sequence[ChatMessage], *, drop_lines: re.Pattern[str] | None = None) -> str:
    """The scripted answer to `messages`: the transformed prompt for an attack, else a benign text.

    `drop_lines`: lines of the system message it matches are left out of what is leaked (the
    attacker who asks for the text "starting with 'You are'", past a canary line planted first).
    """
    prompt = messages[0].content if messages and messages[0].role == "system" else ""
    if drop_lines is not None:
        prompt = "\n".join(line for line in prompt.splitlines() if not drop_lines.search(line))
    users = [m.content for m in messages if m.role == "user"]
    asked = " ".join(users).lower()
    rng = random.Random(  # noqa: S311 - a deterministic script, not a secret
        hashlib.sha256("\x00".join(m.content for m in messages).encode()).digest()
    )
    if prompt and (_ASKS.search(asked) or _CONTINUE.search(users[-1] if users else "")):
        return _transform(prompt, asked, rng)
    return _benign(prompt, users[-1] if users else "", rng)


def _deltas(text: str, rng: random.Random) -> list[str]:
    """Split like a tokenizer would, roughly: 1 to 6 characters a delta."""
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        out.append(text[i : i + n])
        i += n
    return out


class ScriptedLeakyBackend:
    """`ChatBackend` with no model: `answer(messages)`, streamed in deltas of 1 to 6 characters.

    `drop_lines`: see `answer` (None: the whole system message, canary included, is leaked).
    """

    name = "scripted-leaky"

    def __init__(self, *, drop_lines: re.Pattern[str] | None = None) -> None:
        self.drop_lines = drop_lines

    async def complete(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion:
        text = answer(messages, drop_lines=self.drop_lines)
        deltas = _deltas(text, random.Random(len(text)))  # noqa: S311
        finish: str = "stop"
        if len(deltas) > params.max_tokens:
            text, finish = "".join(deltas[: params.max_tokens]), "length"
        usage = Usage(self.count_tokens(messages), min(len(deltas), params.max_tokens))
        return Completion(text, usage, "length" if finish == "length" else "stop")

    async def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[str | StreamEnd]:
        text = answer(messages, drop_lines=self.drop_lines)
        deltas = _deltas(text, random.Random(len(text)))  # noqa: S311
        for d in deltas[: params.max_tokens]:
            yield d
        finish = "length" if len(deltas) > params.max_tokens else "stop"
        yield StreamEnd(
            Usage(self.count_tokens(messages), min(len(deltas), params.max_tokens)),
            "length" if finish == "length" else "stop",
        )

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        # An upper estimate: a token per 3 characters, plus the template's few per message.
        return sum(len(m.content) // 3 + 4 for m in messages)

    async def aclose(self) -> None:
        return None
