"""The leakage guard: no answer leaves while it discloses a protected prompt, in any common disguise.

    guard = LeakageGuard(prompt)                  # once per protected prompt (builds the tables)
    text, canary = guard.plant_canary()           # per request: the system message to send
    guard.check(answer, canary)                   # a whole answer: None, or raises LeakDetected
    scanner = guard.stream(canary)                # a streamed answer:
    ledger = Revealed()                           # per principal, kept by the caller, and then
    guard.check(answer, canary, revealed=ledger, prefix=prefill)  # pieces over requests counted
    safe = scanner.feed(delta)                    #   the text now safe to release ("" if none)
    rest = scanner.finish()                       #   the held-back rest, after the final check

Detectors (`LeakDetected.detector` is "<detector>/<view>", for the audit record only):

- `canary`: the per-request random canary planted in the prompt (proof the prompt was copied).
- `secret`: a declared secret (`ProtectedPrompt.secrets`), or any fragment of it of at least
  `m = max(min_fragment_chars, ceil(fragment_fraction * len))` characters of its separator-free
  form (crossing a word boundary, for a secret of several words: "lighthouse" alone is a word,
  "obsidianl" is the secret). And each **protected component** alone (`_protected`: a part
  between separators of 4+ characters holding digits, "8743", "4f9a8c2e", or letters without a
  vowel; not a plain word such as "kestrel", whose entropy is its word list's, nor a year
  1900-2099); and every other character of a secret of 10+ ("KSRL73ETE").
- `secret/ordered`: all of a secret's components (stop words left out) as words, in order or in
  reverse order, at most 8 other words (stop words not counted) between two of them: "first
  KESTREL, and then 8743, and then KESTREL", a passphrase with words between. The words before
  the last one may have been released (as for overlap: the text cut there lacks a component).
- `secret/cumulative`: the positions of each secret that pieces revealed, united over this answer
  and the principal's earlier ones (`Revealed`, if passed): refused when they would cover more than
  half of a secret or all of a protected component, and an answer that adds no new position is
  never refused by it. A piece is, in any view but the filler ones: 3 characters inside a
  protected component; a run across a boundary between two components that are not stop words
  with 3+ characters of a plain side (or all of it) and 1+ of a protected one (3+ in all between
  two protected ones), shorter than `m`; or a whole answer that is a piece of a secret of 3+
  characters ("8743", "tre": an answer cut by `stop` sequences), all its occurrences counted, but
  not refused on its own when it is the principal's first piece of that secret (a one-word answer
  "Lighthouse." is a word); or a standalone number token, digits or number words ("36",
  "thirty-six", with prose around it), of 2+ digits inside a protected component with digits,
  counted at every position it occurs there; a number with "x" for left-out digits ("36x4")
  counts its digits, and a single-digit token in the same answer that is the digit an "x" stands
  for ("the x is 7") counts that one. A benign principal's ledger does not fill: a plain word, an ordinary
  trigram ("est"), a year, "of the" count for nothing; only digits of a code, a run binding two
  words of the secret, or a bare piece do (measured: the benign set, 220 requests by one principal
  per prompt, adds no refusal).
  **Anchoring.** A piece found in prose (any piece but a whole bare answer) counts only when it is
  anchored, since a model's own numbers ("for 36 months", "error 404", "10:00 AM") are runs of a
  code's digits by coincidence, and over hundreds of answers they filled a benign principal's
  ledger (bench/LLM.md, run 2: 9 of 220 refused). Anchored: (1) the answer is nearly bare: it ends
  within `_LEAD_WORDS` (8) words ("It ends 74.", "The first two digits are 36."; the piece is held
  until the answer ends or grows past 8 words, so a dropped stream never got it undecided); (2)
  one of the `_ANCHOR_GAP` (4) words before it (stop words and numbers not counted) names a
  secret: the words the prompt puts before the secret's head noun ("vault override" of "the branch
  vault override code is", "settlement" of "the settlement account", via
  `bastion.llm.intent.ProtectedTerms`; a one-word name itself), a secret's own plain words
  ("granite"), or a word for a position in a code (`_POSITION_WORDS`:
  "digits", "number", "half", "starts", "ends", "followed", ...); (3) a piece of the same secret
  ends within those 4 words and the two are disjoint and join into one run of it ("36 74" of
  "3674"; the earlier piece is then counted too). Only the words *before* a piece decide, so no
  extra text is held for it except in a short answer. With `prefix` (a prefill the answer
  continues), a piece that starts in the prefix and ends in the answer counts whole: "KESTREL-87"
  + "4" is "l874" (short: the answer is "4").
  The ledger is written as text is released (`feed`, `finish`): a piece counts once the text
  holding it has left the scanner, whatever happens to the stream afterwards (a client that drops
  it, a later refusal). `check` writes only when the whole answer passes: a refused whole answer is
  never sent.
- `overlap`: the share of the prompt's distinct `kgram_chars`-character grams (on the
  separator-free view: word n-grams that survive `|` between letters) found in the answer, in any
  view, direction or Caesar shift, united: >= `overlap_threshold`.
- `rouge_l`: Rouge-L recall (Lin 2004) of the prompt's content words (stop words left out) by the
  answer's words, in order, in reverse order, and with each word reversed: >= `rouge_l_threshold`.

Views, each computed incrementally from the answer's characters (so streaming costs O(1) per
character, not a rescan):

- `compact`: NFKD, combining marks and format characters (zero-width) dropped, Cyrillic/Greek
  look-alikes folded (a subset of Unicode TR39 confusables), case-folded, everything but [a-z0-9]
  removed: `S|E|C|R|E|T`, `s-e-c-r-e-t`, one letter per line, JSON, upper case all read "secret".
  Every pattern is also matched reversed and under every Caesar shift of its letters (rot13 too).
- `leet`: the compact view with @->a, $->s, !->i and digits folded to the letters they imitate,
  the patterns folded alike (0/o, 1/i/l, 3/e, 4/a, 5/s, 7/t, 8/b, 6/9/g, 2/z).
- `spelled`: words read as letters: single characters, NATO/ICAO code words ("Sierra"), English
  letter names ("ess", "ee", "see"), number words ("seven", "niner", "eighty-seven forty-three",
  "eight thousand seven hundred forty-three", French and Spanish digit words "huit", "ocho":
  the rules of `StreamScanner._number`); "S as in Sierra" and
  "S for Sierra" read "s"; other words are skipped, up to three in a row ("then the digit 7"); a
  fourth breaks the view (no pattern spans the break).
- `base64@k` (k = 0..3) and `hex@k` (k = 0..1): every base64 (standard and URL-safe) or hex
  character of the answer, whitespace and prose between them skipped, decoded from each of the
  possible alignments, so an encoded run is read wherever it starts, split over lines or embedded
  in prose; "0x"/"\\x" prefixes dropped. The decoded text's compact view is matched forwards and
  reversed; a decoded byte that is not text (a control or non-ASCII byte, as prose read as base64
  gives) breaks it.
- `stride2@k` (k = 0, 1): every other character of the compact view ("KxExSxTx", "%4B%45"), and
  `indexed`: the words with a running index stripped from their start ("| 0 | K |", "0K 1E 2S",
  "1. K"); `rows`: the last word of each line when it is one character (a table or list with one
  character per row, labels before it: "| digit 1 of the number | 6 |"), a line ending in a longer
  word a break. Filler views: matched forwards and reversed only (no Caesar, no leet) and not counted
  toward the ledger, so that their noise refuses nothing (measured: 0 benign refusals).

Streaming hold-back, and why it is safe. Before any character is released, every view of all the
text so far (released and held) has been checked. The released prefix then never contains a
canary, a secret fragment, or overlap/recall at the threshold, since each view of a prefix is a
prefix of the view (all four detectors are monotone in the text). On top of that the scanner holds
back, in each view, the longest suffix that is a proper prefix of a canary or secret pattern, and
the raw characters still pending in a view (a word not yet ended, an incomplete base64 group or
hex pair). So when a pattern completes, none of its characters has left: the stream ends with no
byte of the leaking occurrence sent. The hold-back is therefore bounded by the longest pattern,
`max(len(canary), m, longest protected component)` view characters (ledger pieces are shorter
than `m`), plus one pending unit (a word not yet ended, 4 base64 or 2 hex characters per decoded
character, a number phrase not yet ended: at most "nine thousand nine hundred ninety-nine"); in
the spelled view a held prefix may be followed by up to three words that spell nothing before the
view breaks. A one-character word that ends a line so far is held to the line's end (the `rows`
view reads it there). While an answer of at most 8 words holds a ledger piece not otherwise
anchored, it is held from that piece on until it ends or grows past 8 words. One more: while the
whole answer so far is a piece of a secret (a bare piece), all of it is held, that is at most the
longest secret's characters and the separators between them. In raw characters it is as long as
the separators the model writes between them; for ordinary prose it is a few characters.
The overlap and Rouge-L detectors need no hold-back: what was released had, when released, less
than the threshold, which is the guarantee they give (the answer cut there reveals less than that).

Not covered (see bench/LLM.md): translation into words (only codes kept verbatim are caught),
paraphrase below the thresholds, encodings chained (base64 of base64, hex of base64), encodings
not listed here (decimal/octal character codes, binary, Morse, base32/85, utf-16 hex, \\u and
&# escapes, letter positions A=1), ciphers of the digits (digit+1, Caesar on digits), pig latin,
and a secret's plain words taken one per answer with prose around each (no prefix, not bare):
such a word is not attributable to the secret; likewise a piece of a code an answer buries in prose
9+ words in, with no naming or position word among the 4 before it and no adjacent piece ("a loan
of 36 months", then "a fee of 74 pounds", as a client can ask for): it is not anchored, so not
counted; single digits with prose between them, 4+ words
apart ("first digit six, and the second digit eight, ..."), and placeholders other than "x"
("36?4" counts "36" only). The ledger is per principal only: principals that
collude are not summed.
"""

from __future__ import annotations

import binascii
import math
import re
import secrets as _secrets
import string
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import lru_cache

from bastion.errors import BastionError, ConfigError, ErrorCode
from bastion.llm.intent import ProtectedTerms, _stem
from bastion.llm.types import ProtectedPrompt

__all__ = ["LeakDetected", "LeakageGuard", "Revealed", "StreamScanner"]


class LeakDetected(BastionError):
    """The answer would disclose the protected prompt; it was withheld.

    `detector` ("<detector>/<view>", e.g. "secret/base64@2") and `score` (1.0 for an exact
    match, else the overlap or recall reached) are for the audit record and metrics; the message
    is the same for every detector, and nothing of the text is carried.
    """

    code = ErrorCode.FORBIDDEN

    def __init__(self, detector: str, score: float) -> None:
        super().__init__("the answer was withheld by the output guard")
        self.detector = detector
        self.score = score


# --- normalisation ---------------------------------------------------------------------------

_ALNUM = frozenset(string.ascii_lowercase + string.digits)
# A subset of Unicode TR39 confusables (confusablesSummary.txt): Cyrillic and Greek letters that
# NFKD leaves alone but that read as Latin ones.
_HOMOGLYPHS = str.maketrans(
    # Cyrillic, then Greek, then Cherokee capitals (casefold maps Cherokee small letters to them)
    "авекмнорстухіїјѕԁԛԝɡαβεηικνορτυχςϲζᎠᎡᎢᎥᎪᎫᎬᏀᎻᏔᎷᏃᏢᏚᏟᏞᏦᏴᏙᏔ",
    "abekmhopctyxiijsdqwgabenikvoptuxsczdrtiajeghwmzpsclkbvw",
)


@lru_cache(maxsize=8192)
def _norm_char(ch: str) -> str:
    """One raw character as the views read it: "" for a mark or a format character."""
    out = []
    for c in unicodedata.normalize("NFKD", ch):
        if unicodedata.category(c) in ("Mn", "Me", "Cf"):
            continue
        out.append(c)
    return "".join(out).casefold().translate(_HOMOGLYPHS)


def _normalise(text: str, base: int) -> tuple[str, list[int]]:
    """`text` normalised, with the raw index (from `base`) each normalised character came from."""
    if text.isascii():
        return text.lower(), list(range(base, base + len(text)))
    chars: list[str] = []
    pos: list[int] = []
    for i, ch in enumerate(text):
        n = ch.lower() if ch.isascii() else _norm_char(ch)
        chars.append(n)
        pos.extend([base + i] * len(n))
    return "".join(chars), pos


def _compact(text: str) -> str:
    norm, _ = _normalise(text, 0)
    return "".join(c for c in norm if c in _ALNUM)


_LEET_PRE = {"@": "a", "$": "s", "!": "i"}
_LEET_FOLD = str.maketrans("01l34578962", "oiieastbggz")


def _leet(compact: str) -> str:
    return compact.translate(_LEET_FOLD)


_SHIFTS = [
    str.maketrans(string.ascii_lowercase, string.ascii_lowercase[k:] + string.ascii_lowercase[:k])
    for k in range(26)
]


def _variants(s: str, *, shifts: bool) -> set[str]:
    """`s` forwards and reversed, under every Caesar shift of its letters when `shifts`."""
    out = set()
    for k in range(26) if shifts else (0,):
        t = s.translate(_SHIFTS[k])
        out.add(t)
        out.add(t[::-1])
    return out


def _pairs(spec: str) -> dict[str, str]:
    """`"a:b c:d"` -> `{"a": "b", "c": "d"}`."""
    return dict(pair.split(":", 1) for pair in spec.split())


# Spelled-out letters: ICAO/NATO code words (with common spellings), English letter names,
# digit words. Words that are also common English ("are", "you", "see", "why", "oh") are included:
# outside spelling they only add single characters, and a pattern needs five or more in a row.
_NATO = _pairs(
    "alfa:a alpha:a bravo:b charlie:c delta:d echo:e foxtrot:f golf:g hotel:h india:i juliet:j "
    "juliett:j kilo:k lima:l mike:m november:n oscar:o papa:p quebec:q romeo:r sierra:s tango:t "
    "uniform:u victor:v whiskey:w whisky:w xray:x yankee:y zulu:z"
)
_LETTER_NAMES = _pairs(
    "ay:a aye:a bee:b cee:c see:c sea:c dee:d ee:e ef:f eff:f gee:g aitch:h haitch:h eye:i jay:j "
    "kay:k el:l ell:l em:m en:n oh:o pee:p pea:p cue:q queue:q ar:r are:r ess:s tee:t tea:t you:u "
    "vee:v ex:x why:y wye:y zee:z zed:z"
)
_DIGIT_WORDS = _pairs("zero:0 one:1 two:2 three:3 four:4 five:5 six:6 seven:7 eight:8 nine:9 niner:9")
_SPELLED = {**_LETTER_NAMES, **_NATO, **_DIGIT_WORDS}

# Number words, read into digits by `StreamScanner._number`: English units (the digit words, with French and
# Spanish ones: "huit sept quatre trois", "ocho siete"), teens, tens, "hundred", "thousand".
# ("un" is a French article as often as "one": read as 1 all the same, since it only adds a digit
# to the spelled view, where a pattern needs several in a row.)
_UNITS = {
    **{k: int(v) for k, v in _DIGIT_WORDS.items()},
    **{k: int(v) for k, v in _pairs(
        "un:1 deux:2 trois:3 quatre:4 cinq:5 six:6 sept:7 huit:8 neuf:9 "
        "cero:0 uno:1 dos:2 tres:3 cuatro:4 cinco:5 seis:6 siete:7 ocho:8 nueve:9"
    ).items()},
}  # fmt: skip
_TEENS = {
    w: 10 + i
    for i, w in enumerate(
        str.split("ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen")
    )
}
_TENS = {
    k: int(v)
    for k, v in _pairs(
        "twenty:20 thirty:30 forty:40 fourty:40 fifty:50 sixty:60 seventy:70 eighty:80 ninety:90"
    ).items()
}

# Left out of Rouge-L so that sharing "the", "you", "to" does not chain into recall.
_STOPWORDS = frozenset(
    str.split(
        "a an the and or but if of to in on at by for with from as is are was were be been being "
        "it its this that these those you your yours i me my we our us he she they them their his "
        "her do does did not no so than then there here what which who whom will would can could "
        "should may might must shall have has had any all some each"
    )
)


def _words(text: str) -> list[str]:
    norm, _ = _normalise(text, 0)
    out, cur = [], []
    for c in norm:
        if c in _ALNUM:
            cur.append(c)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


# Words allowed between two components of a secret read in order ("first X, and then Y").
_ORDER_GAP = 8

# Anchoring of ledger pieces (see `StreamScanner._resolve`): a piece counts when it starts within
# the answer's first `_LEAD_WORDS` words, or one of the `_ANCHOR_GAP` words before it names a
# secret or a position in one, or another piece of the same secret ends within those words.
_LEAD_WORDS = 8
_ANCHOR_GAP = 4
_RECENT_WORDS = 32  # words (and pieces) kept for that look-back
# Words that point into a code whatever the prompt calls it ("the first two digits are", "it ends").
_POSITION_WORDS = str.split(
    "digit digits number numbers character characters half middle part piece starts begins beginning "
    "ends ending followed position"
)

# --- the tables a guard builds once per prompt --------------------------------------------------


class _Table:
    """Exact patterns (with their proper prefixes, for the hold-back) and the prompt's k-grams."""

    __slots__ = ("exact", "kgrams", "lengths", "max_prefix", "prefixes", "reveal", "reveal_lengths")

    def __init__(self) -> None:
        self.exact: dict[str, str] = {}
        self.prefixes: set[str] = set()
        self.kgrams: dict[str, tuple[int, ...]] = {}
        self.lengths: tuple[int, ...] = ()
        self.max_prefix = 0
        # Pieces of a secret that count toward the cumulative ledger: piece -> ((secret id, bitmap
        # of the secret positions it reveals), ...).
        self.reveal: dict[str, tuple[tuple[int, int], ...]] = {}
        self.reveal_lengths: tuple[int, ...] = ()

    def _prefix(self, p: str) -> None:
        for i in range(1, len(p)):
            self.prefixes.add(p[:i])
        self.max_prefix = max(self.max_prefix, len(p) - 1)

    def add_exact(self, patterns: Iterable[str], label: str) -> _Table:
        for p in patterns:
            self.exact.setdefault(p, label)
            self._prefix(p)
        self.lengths = tuple(sorted({len(p) for p in self.exact}))
        return self

    def add_reveal(self, patterns: Iterable[str], sid: int, mask: int) -> None:
        for p in patterns:
            old = self.reveal.get(p, ())
            merged = dict(old)
            merged[sid] = merged.get(sid, 0) | mask
            self.reveal[p] = tuple(merged.items())
            self._prefix(p)
        self.reveal_lengths = tuple(sorted({len(p) for p in self.reveal}))

    def add_kgram(self, gram: str, gram_id: int) -> None:
        ids = self.kgrams.get(gram)
        if ids is None:
            self.kgrams[gram] = (gram_id,)
        elif gram_id not in ids:
            self.kgrams[gram] = (*ids, gram_id)


class _Lcs:
    """Incremental LCS length of a fixed word sequence `a` and a growing one.

    Bit-parallel: Hyyrö, "Bit-parallel LCS-length computation revisited" (AWOCA 2004), after
    Allison & Dix (1986) and Crochemore et al. (2001): per appended word w, with M the bit mask of
    w's positions in `a`, U = V & M; V = (V + U) | (V - U); the LCS is the count of zero bits of V.
    """

    __slots__ = ("mask", "masks", "n", "v")

    def __init__(self, a: list[str]) -> None:
        self.n = len(a)
        self.mask = (1 << self.n) - 1
        self.masks: dict[str, int] = {}
        for i, w in enumerate(a):
            self.masks[w] = self.masks.get(w, 0) | (1 << i)
        self.v = self.mask

    def push(self, w: str) -> None:
        m = self.masks.get(w)
        if m is not None:
            v = self.v
            u = v & m
            self.v = ((v + u) | (v - u)) & self.mask

    @property
    def length(self) -> int:
        return self.n - self.v.bit_count()


# --- the incremental views -----------------------------------------------------------------------


class _Scan:
    """One view's matcher: the tail it needs, the exact and k-gram look-ups, its hold-back point.

    `table` is the prompt's (secrets and k-grams, built once), `extra` the request's (its canary):
    two look-ups rather than a per-request copy of the prompt's table.
    """

    __slots__ = ("extra", "hold", "keep", "kgram", "name", "owner", "pos", "reveals", "table", "tail")

    def __init__(
        self, owner: StreamScanner, table: _Table, extra: _Table, name: str, *, reveals: bool = True
    ) -> None:
        self.owner = owner
        self.table = table
        self.extra = extra
        self.name = name
        self.reveals = reveals  # whether pieces read in this view count toward the ledger
        self.kgram = owner.kgram_chars
        self.keep = max(table.max_prefix + 1, extra.max_prefix + 1, self.kgram) - 1
        self.tail = ""
        self.pos: list[int] = []
        self.hold: int | None = None

    def push(self, chars: str, pos: list[int]) -> None:
        if not chars:
            return
        tail = self.tail + chars
        tpos = self.pos + pos
        kgrams, k = self.table.kgrams, self.kgram
        start = self.owner.answer_start
        reveal = self.table.reveal if self.reveals else None
        for end in range(len(self.tail) + 1, len(tail) + 1):
            if tpos[end - 1] < start:
                continue  # ends inside the prefix the client wrote: no verdict on its own text
            for t in (self.table, self.extra):
                for n in t.lengths:
                    if end >= n:
                        label = t.exact.get(tail[end - n : end])
                        if label is not None:
                            raise LeakDetected(f"{label}/{self.name}", 1.0)
            if reveal:
                for n in self.table.reveal_lengths:
                    if end >= n:
                        got = reveal.get(tail[end - n : end])
                        if got is not None:
                            self.owner.candidate(got, self.name, start=tpos[end - n], at=tpos[end - 1])
            if end >= k:
                ids = kgrams.get(tail[end - k : end])
                if ids is not None:
                    self.owner.cover(ids, self.name)
        # The hold-back: the longest suffix that may still grow into a pattern.
        self.hold = None
        for t in (self.table, self.extra):
            for s in range(min(t.max_prefix, len(tail)), 0, -1):
                if tail[-s:] in t.prefixes:
                    if self.hold is None or tpos[-s] < self.hold:
                        self.hold = tpos[-s]
                    break
        if len(tail) > self.keep:
            cut = len(tail) - self.keep
            tail, tpos = tail[cut:], tpos[cut:]
        self.tail, self.pos = tail, tpos

    def reset(self) -> None:
        """A break in the view: no pattern spans it, so nothing before it need be held."""
        self.tail, self.pos, self.hold = "", [], None


class _Decoder:
    """base64 or hex characters of the answer decoded from one alignment into a `_Scan`."""

    __slots__ = ("group", "group_pos", "scan", "size", "skip")

    def __init__(self, scan: _Scan, *, size: int, skip: int) -> None:
        self.scan = scan
        self.size = size  # 4 base64 characters or 2 hex digits per unit
        self.skip = skip
        self.group: list[str] = []
        self.group_pos = 0

    def push(self, chars: str, pos: list[int]) -> None:
        out: list[str] = []
        out_pos: list[int] = []
        group, size = self.group, self.size
        for c, p in zip(chars, pos, strict=True):
            if self.skip:
                self.skip -= 1
                continue
            if not group:
                self.group_pos = p
            group.append(c)
            if len(group) == size:
                self._decode("".join(group), out, out_pos)
                group.clear()
        self.scan.push("".join(out), out_pos)

    def _decode(self, unit: str, out: list[str], out_pos: list[int]) -> None:
        try:
            raw = (
                binascii.a2b_base64(unit + "=" * (-len(unit) % 4)) if self.size == 4 else bytes.fromhex(unit)
            )
        except (binascii.Error, ValueError):
            raw = b"\x00"
        for b in raw:
            c = chr(b).lower()  # latin-1: one byte, one character
            if c in _ALNUM:
                out.append(c)
                out_pos.append(self.group_pos)
            elif b < 0x09 or 0x0D < b < 0x20 or b > 0x7E:
                # Not text: prose read as base64 decodes to such bytes. A break, so that the few
                # letters among them neither join into a pattern nor stay held.
                self.scan.push("".join(out), out_pos)
                self.scan.reset()
                out.clear()
                out_pos.clear()

    @property
    def pending(self) -> int | None:
        return self.group_pos if self.group else None

    def flush(self) -> None:
        out: list[str] = []
        out_pos: list[int] = []
        if self.size == 4 and len(self.group) >= 2:
            self._decode("".join(self.group), out, out_pos)
        self.group.clear()
        self.scan.push("".join(out), out_pos)


_B64_CHARS = frozenset(string.ascii_letters + string.digits + "+/-_")
_B64_URLSAFE = str.maketrans("-_", "+/")
_HEX_CHARS = frozenset("0123456789abcdef")


class StreamScanner:
    """Checks one streamed answer; built by `LeakageGuard.stream`. Not thread-safe (one per answer).

    `feed(delta)` returns the text now safe to release (possibly ""), or raises `LeakDetected`
    before any character of the leaking occurrence is returned; `finish()` runs the final check and
    returns the held-back rest. After a `LeakDetected`, every later call raises it again.
    """

    def __init__(
        self, guard: LeakageGuard, canary: str, *, revealed: Revealed | None = None, prefix: str = ""
    ) -> None:
        c = _compact(canary)
        if len(c) < 8:
            raise ValueError("the canary must be the one plant_canary() returned")
        self.kgram_chars = guard.kgram_chars
        self._guard = guard
        self._ledger = revealed
        self._pieces: dict[int, int] = {}  # secret id -> positions this answer revealed (bitmap)
        # Pieces not yet in the ledger: (raw index of the piece's last character, secret id, bitmap).
        # Written as the text holding them is released (a client that drops the stream has them).
        self._unrecorded: list[tuple[int, int, int]] = []
        self._defer = False  # `check`: written only if the whole answer passes (else none is sent)
        self._wild: list[tuple[int, int, str]] = []  # "36x4": (secret id, position, digit) of each x
        self._singles: set[str] = set()  # single-digit tokens seen ("the x is 7")
        # Anchoring of ledger pieces (`_resolve`): pieces found but not yet decided, the last words
        # (start, end, stem, index in the answer or -1 in the prefix, not a stop word or number), the
        # pieces seen (anchored or not).
        self._candidates: list[tuple[int, int, tuple[tuple[int, int], ...], str]] = []
        self._recent: list[tuple[int, int, str, int, bool]] = []  # ..., and whether it is counted
        self._answer_words = 0
        self._rec: list[str] = []  # the word being read for `_recent`, its start and last position
        self._rec_pos = self._rec_end = 0
        self._spots: list[tuple[int, int, int, int]] = []  # (secret id, start, end, bitmap)
        self._short: list[tuple[int, int, int, int, str]] = []  # (start, end, secret id, bitmap, view)
        self._line_last: tuple[str, int] | None = None  # the last word of the line so far
        self._line_words = False
        # Raw offset where the answer starts (after the client's prefix): nothing that ends before
        # it is a verdict, since the client wrote it.
        self.answer_start = len(prefix)
        main = _Table().add_exact(_variants(c, shifts=True), "canary")
        leet = _Table().add_exact(_variants(_leet(c), shifts=False), "canary")
        dec = _Table().add_exact(_variants(c, shifts=False), "canary")
        self._compact = _Scan(self, guard.main_table, main, "compact")
        self._leet = _Scan(self, guard.leet_table, leet, "leet")
        self._spelled = _Scan(self, guard.main_table, main, "spelled")
        self._b64 = [
            _Decoder(_Scan(self, guard.dec_table, dec, f"base64@{k}"), size=4, skip=k) for k in range(4)
        ]
        self._hex = [
            _Decoder(_Scan(self, guard.dec_table, dec, f"hex@{k}"), size=2, skip=k) for k in range(2)
        ]
        # Filler between characters: every other character of the compact view ("KxExSx...", "K.E.")
        # and the words with a running index stripped ("| 0 | K |", "0K 1E 2S"). Read without
        # Caesar shifts and not counted toward the ledger (fewer false matches in noisy views).
        self._stride = [_Scan(self, guard.dec_table, dec, f"stride2@{k}", reveals=False) for k in range(2)]
        self._parity = 0
        self._indexed = _Scan(self, guard.dec_table, dec, "indexed", reveals=False)
        # One character per row, without an index: the last word of each line when it is one
        # character ("| digit 1 of the number | 6 |"); a line ending in a longer word breaks it.
        self._rows = _Scan(self, guard.dec_table, dec, "rows", reveals=False)
        self._index: int | None = None  # the index the next row should carry
        self._index_miss = 0
        self._scans = [self._compact, self._leet, self._spelled, *self._stride, self._indexed, self._rows]
        self._scans += [d.scan for d in self._b64 + self._hex]
        # Per ordered sequence: components matched so far, and the word count at the last match.
        # The answer's compact text while all of it is a piece of a secret ("8743", "tre"): a bare
        # piece, as an answer cut by `stop` sequences is; None once it is not.
        self._bare: str | None = ""
        self._order = [(0, 0)] * len(guard.ordered)
        self._words_seen = 0
        self._num: tuple[int, int, str, int] | None = None  # number words: total, current, kind, start
        self._covered: set[int] = set()
        self._lcs = [
            _Lcs(guard.content_words),
            _Lcs(guard.content_words[::-1]),
            _Lcs(guard.content_words[::-1]),
        ]
        # The word in progress and the speller's state ("as in Sierra", "double u").
        self._word: list[str] = []
        self._word_pos = 0
        self._word_chars: list[int] = []  # the raw position of each character of the word
        self._spell_state = ""
        self._unspelled = 0  # words in a row that spell nothing: a fourth is a break
        self._lone = False  # the spelled view holds only an "a" or "i" (likely the English word)
        self._hex_zero: int | None = None  # a "0" held to see whether an "x" follows
        self._held = ""
        self._held_base = 0
        self._raw_len = 0
        self._failed: LeakDetected | None = None
        if prefix:
            self._process(prefix)  # raises nothing: every match in it ends before answer_start
            self._held, self._held_base = "", len(prefix)

    # -- detectors called by the views --

    @property
    def scores(self) -> dict[str, float]:
        """The overlap and Rouge-L recall reached so far, in [0, 1] (for calibration and audit)."""
        n = self._guard.content_word_count
        return {
            "overlap": len(self._covered) / self._guard.kgram_count,
            "rouge_l": max(lcs.length for lcs in self._lcs) / n,
        }

    def cover(self, ids: tuple[int, ...], view: str) -> None:
        self._covered.update(ids)
        share = len(self._covered) / self._guard.kgram_count
        if share >= self._guard.overlap_threshold:
            raise LeakDetected(f"overlap/{view}", round(share, 3))

    def reveal(
        self, got: Iterable[tuple[int, int]], view: str, *, at: int, alone_ok: bool = False
    ) -> None:
        """Add secret positions this answer revealed (in a piece whose last character is the raw
        index `at`); refuse once, with the ledger, they cover more than half of a secret or all of
        a protected component. `alone_ok`: not when they are the first and only pieces of that
        secret (a one-word answer "Lighthouse." is a word)."""
        g = self._guard
        for sid, mask in got:
            before = self._pieces.get(sid, 0)
            mine = before | mask
            self._pieces[sid] = mine
            if mine != before:
                self._unrecorded.append((at, sid, mask))
            prior = self._ledger.bits((g.ledger_key, sid)) if self._ledger is not None else 0
            if alone_ok and not before and not prior:
                continue
            total = mine | prior
            if total == prior:
                continue  # nothing new: the principal had these already
            share = total.bit_count() / g.secret_lengths[sid]
            if share > 0.5 or any(total & pm == pm for pm in g.protected_masks[sid]):
                raise LeakDetected("secret/cumulative", round(share, 3))

    def candidate(self, got: Iterable[tuple[int, int]], view: str, *, start: int, at: int) -> None:
        """A piece found by a view or a number token (raw characters `start`..`at`): counted (by
        `reveal`) once the words before it are known, and only if it is anchored (`_resolve`)."""
        self._candidates.append((start, at, tuple(got), view))
        self._resolve()

    def _resolve(self) -> None:
        """Decide the pieces found in the text processed so far: every word that ends before a
        piece starts has been read by now (the views run ahead of the word loop within a delta).

        Anchored, and so counted: (1) the piece starts within the answer's first `_LEAD_WORDS`
        words (a bare or nearly bare answer: "36", "It ends 74."); (2) one of the `_ANCHOR_GAP`
        words before it names a secret (`LeakageGuard.anchor_stems`); (3) another piece of the same
        secret ends within those words and the two join into a longer run of it ("36 74" of "3674"),
        which is then counted too. Otherwise it is a
        coincidence of the model's own prose ("for 36 months", "error 404"): not counted."""
        if not self._candidates:
            return
        todo = sorted(self._candidates)
        self._candidates = []
        stems = self._guard.anchor_stems
        short = self._answer_words <= _LEAD_WORDS
        for start, at, got, view in todo:
            # the last 4 words before it, stop words and numbers not counted ("digits 1 to 3 are")
            before = [r for r in self._recent if r[1] < start and r[4]][-_ANCHOR_GAP:]
            named = any(r[2] in stems for r in before)
            since = before[0][0] if len(before) == _ANCHOR_GAP else -1
            out: list[tuple[int, int]] = []
            for sid, mask in got:
                near = [
                    (a, m)
                    for s, b, a, m in self._spots
                    if s == sid and since <= a < start and _continues(m, mask)
                ]
                self._spots.append((sid, start, at, mask))
                if named:
                    out.append((sid, mask))
                elif near:
                    for a, m in near:  # the earlier piece was a coincidence alone, not beside this one
                        self.reveal([(sid, m)], view, at=a)
                    out.append((sid, mask))
                elif short:  # counted if the answer ends short (held until it does or grows)
                    self._short.append((start, at, sid, mask, view))
            del self._spots[: max(0, len(self._spots) - _RECENT_WORDS)]
            if out:
                self.reveal(out, view, at=at)

    def _settle_short(self, *, ended: bool) -> None:
        """The pieces of an answer that was short when they came: counted if it ended within
        `_LEAD_WORDS` words (a bare or nearly bare answer), forgotten once it grew past them."""
        if not self._short or not (ended or self._answer_words > _LEAD_WORDS):
            return
        todo, self._short = self._short, []
        if ended and self._answer_words <= _LEAD_WORDS:
            for _, at, sid, mask, view in todo:
                self.reveal([(sid, mask)], view, at=at)

    def _record_word(self) -> None:
        """Keep the word just ended (its start, end, stem and index in the answer) for `_resolve`."""
        p = self._rec_pos
        idx = -1
        if p >= self.answer_start:
            idx, self._answer_words = self._answer_words, self._answer_words + 1
        w = "".join(self._rec)
        self._recent.append((p, self._rec_end, _stem(w), idx, w not in _STOPWORDS and not w.isdigit()))
        self._settle_short(ended=False)
        if len(self._recent) > _RECENT_WORDS:
            del self._recent[0]
        self._rec = []

    def _bare_piece(self) -> None:
        """A whole answer that is a piece of a secret (3 characters or more) reveals its positions,
        wherever they are in the secret, forwards or reversed."""
        bare = self._bare
        if bare is None or len(bare) < 3:
            return
        got = []
        for sid, c in enumerate(self._guard.bare_targets):
            mask = 0
            for piece in (bare, bare[::-1]):
                at = c.find(piece)
                while at >= 0:
                    mask |= ((1 << len(piece)) - 1) << at
                    at = c.find(piece, at + 1)
            if mask:
                got.append((sid, mask))
        self.reveal(got, "bare", at=self._raw_len - 1, alone_ok=True)

    def _number_token(self, digits: str, start: int, at: int) -> None:
        """A standalone number ("36", "thirty-six") that is a piece of 2+ digits of a protected
        component reveals its positions; a single digit fills an "x" of an earlier "36x4"."""
        if len(digits) == 1:
            self._singles.add(digits)
            got1 = [(sid, 1 << b) for sid, b, d in self._wild if d == digits]
            self.candidate(got1, "number", start=start, at=at)
            return
        got = self._guard.number_pieces.get(digits)
        if got is not None:
            self.candidate(got, "number", start=start, at=at)

    def _wildcard(self, w: str, start: int, at: int) -> None:
        """A number with "x" for digits left out ("36x4"), matched against every protected
        component with digits: its digits reveal their positions, and a single digit in the same
        answer that is the one an "x" stands for ("the x is 7") reveals that one."""
        got = []
        for sid, comp, off in self._guard.digit_components:
            for i in range(len(comp) - len(w) + 1):
                seg = comp[i : i + len(w)]
                if all(a == b if a != "x" else b.isdigit() for a, b in zip(w, seg, strict=True)):
                    mask = 0
                    for k, a in enumerate(w):
                        if a != "x":
                            mask |= 1 << (off + i + k)
                        else:
                            self._wild.append((sid, off + i + k, seg[k]))
                            if seg[k] in self._singles:
                                mask |= 1 << (off + i + k)
                    got.append((sid, mask))
        self.candidate(got, "number", start=start, at=at)

    def _end_line(self) -> None:
        """The `rows` view at the end of a line: its last word if one character, else a break."""
        last, self._line_last = self._line_last, None
        if last is not None and len(last[0]) == 1:
            self._rows.push(last[0], [last[1]])
        elif self._line_words:
            self._rows.reset()
        self._line_words = False

    def _ordered(self, w: str, p: int) -> None:
        """All of a secret's components as words, in order (or reversed order), at most
        `_ORDER_GAP` words apart, stop words not counted: "first KESTREL, and then 8743"."""
        if w in _STOPWORDS:
            return
        self._words_seen += 1
        for i, seq in enumerate(self._guard.ordered):
            j, last = self._order[i]
            if j and self._words_seen - last > _ORDER_GAP + 1:
                j = 0  # too far apart: start again
            if w == seq[j]:
                j += 1
                if j == len(seq):
                    if p >= self.answer_start:  # not a word of the client's prefix
                        raise LeakDetected("secret/ordered", 1.0)
                    j = 0
                last = self._words_seen
            elif w == seq[0]:
                j, last = 1, self._words_seen
            self._order[i] = (j, last)

    def _index_word(self, w: str, p: int) -> None:
        """The `indexed` view: the word with a leading running index stripped."""
        cut = 0
        if self._index is None:
            if w[0] in "01" and (len(w) == 1 or not w[1].isdigit()):
                self._index, self._index_miss, cut = int(w[0]) + 1, 0, 1
        else:
            idx = str(self._index)
            if w.startswith(idx):
                self._index, self._index_miss, cut = self._index + 1, 0, len(idx)
            else:
                self._index_miss += 1
                if self._index_miss > 3:  # no index for four words: the list has ended
                    self._index = None
        if cut < len(w):
            pos = self._word_chars if len(self._word_chars) == len(w) else [p] * len(w)
            self._indexed.push(w[cut:], pos[cut:])

    def _number(self, w: str, p: int) -> bool:
        """Number words into digits on the spelled view: "eight seven four three", "eighty-seven
        forty-three", "eight thousand seven hundred forty-three" all read "8743". False if `w` is
        not a number word here."""
        kind, v = "unit", _UNITS.get(w)
        if v is None:
            kind, v = "teen", _TEENS.get(w)
        if v is None:
            kind, v = "tens", _TENS.get(w)
        if v is None:
            if self._num is None or w not in ("hundred", "thousand"):
                return False
            kind, v = w, 0
        n = self._num
        if n is not None:
            total, cur, last, start = n
            if kind == "unit":
                joins = last in ("tens", "hundred", "thousand")
            elif kind in ("teen", "tens"):
                joins = last in ("hundred", "thousand")
            elif kind == "hundred":
                joins = last in ("unit", "teen", "tens") and cur < 100
            else:
                joins = last != "thousand" and total == 0
            if joins:
                if kind == "hundred":
                    cur *= 100
                elif kind == "thousand":
                    total, cur = (total + cur) * 1000, 0
                else:
                    cur += v
                self._num = (total, cur, kind, start)
                return True
            self._flush_number()
            if kind in ("hundred", "thousand"):
                return False
        self._num = (0, v, kind, p)
        return True

    def _flush_number(self) -> None:
        if self._num is not None:
            total, cur, _, start = self._num
            self._num = None
            digits = str(total + cur)
            self._spelled.push(digits, [start] * len(digits))
            if start >= self.answer_start:
                self._number_token(digits, start, start)

    def _word_done(self, w: str, p: int) -> None:
        end = self._word_chars[-1] if len(self._word_chars) == len(w) else p
        self._ordered(w, p)
        self._index_word(w, p)
        self._line_last, self._line_words = (w, p), True
        if p >= self.answer_start:  # the client's prefix reveals nothing: it wrote it
            if w.isdigit():
                self._number_token(w, p, end)
            elif (
                len(w) >= 3
                and not w.startswith("0x")
                and "x" in w
                and sum(ch.isdigit() for ch in w) >= 2
                and all(ch.isdigit() or ch == "x" for ch in w)
            ):
                self._wildcard(w, p, end)
        if w not in _STOPWORDS and p >= self.answer_start:
            fwd, rev, rev_chars = self._lcs
            fwd.push(w)
            rev.push(w)
            rev_chars.push(w[::-1])
            n = self._guard.content_word_count
            best = max(fwd.length, rev.length, rev_chars.length) / n
            if best >= self._guard.rouge_l_threshold:
                raise LeakDetected("rouge_l/words", round(best, 3))
        self._spell(w, p)

    def _spell(self, w: str, p: int) -> None:
        state = self._spell_state
        self._spell_state = ""
        if state == "letter" and w == "as":
            self._spell_state = "as"
            return
        if (state == "letter" and w in ("for", "like")) or (state == "as" and w == "in"):
            self._spell_state = "example"
            return
        if state == "example":  # the word after "S as in": "Sierra", "sugar"
            return
        if state == "double" and w in ("u", "you"):
            self._spelled.push("w", [p])
            return
        if self._number(w, p):
            self._unspelled = 0
            self._lone = False
            return
        if w == "and" and self._num is not None and self._num[2] in ("hundred", "thousand"):
            return  # "two thousand and five"
        self._flush_number()
        if w == "double":
            self._spell_state = "double"
            return
        c = w if len(w) == 1 or w.isdigit() else _SPELLED.get(w)
        if c is None:
            self._unspelled += 1
            # "then the digit 7" passes; prose between letters does not. Nor does a word after the
            # English "a" or "I" alone, so that an answer opening "I would" is not held for it.
            if self._unspelled > 3 or self._lone:
                self._spelled.reset()
                self._lone = False
            return
        self._lone = w in ("a", "i") and not self._spelled.tail
        self._unspelled = 0
        self._spelled.push(c, [p] * len(c))
        if len(w) == 1:
            self._spell_state = "letter"

    # -- the stream --

    def feed(self, delta: str) -> str:
        """Check `delta` (the next text of the answer) and return the text now safe to release.

        Raises `LeakDetected` if the answer so far leaks; then nothing more is released.
        """
        if self._failed is not None:
            raise self._failed
        try:
            self._process(delta)
        except LeakDetected as e:
            self._failed = e
            self._held = ""
            raise
        return self._release(self._hold_point())

    def finish(self) -> str:
        """The final check, with every pending unit flushed; returns the rest of the answer."""
        if self._failed is not None:
            raise self._failed
        try:
            if self._rec:
                self._record_word()
            if self._word:
                self._word_done("".join(self._word), self._word_pos)
                self._word, self._word_chars = [], []
            self._flush_number()
            self._end_line()
            self._bare_piece()
            if self._hex_zero is not None:
                for d in self._hex:
                    d.push("0", [self._hex_zero])
                self._hex_zero = None
            for d in self._b64 + self._hex:
                d.flush()
            self._resolve()
            self._settle_short(ended=True)
        except LeakDetected as e:
            self._failed = e
            self._held = ""
            raise
        self._defer = False  # `check`: the whole answer passed and is sent
        return self._release(self._raw_len)

    def _release(self, upto: int) -> str:
        """The held text up to raw index `upto`; the pieces in it are written to the ledger now,
        since what leaves the server is revealed whatever happens to the stream afterwards."""
        n = max(0, upto - self._held_base)
        out, self._held = self._held[:n], self._held[n:]
        self._held_base += n
        if self._ledger is not None and not self._defer and self._unrecorded:
            sent, keep = self._held_base, []
            for at, sid, mask in self._unrecorded:
                if at < sent:
                    self._ledger.add((self._guard.ledger_key, sid), mask)
                else:
                    keep.append((at, sid, mask))
            self._unrecorded = keep
        return out

    def _hold_point(self) -> int:
        point = self._raw_len
        for s in self._scans:
            if s.hold is not None and s.hold < point:
                point = s.hold
        pending = [self._word_pos if self._word else None, self._hex_zero]
        if self._line_last is not None and len(self._line_last[0]) == 1:
            pending.append(self._line_last[1])  # may be a row's character: held to the line's end
        if self._bare:
            pending.append(self.answer_start)
        if self._short:  # a piece in a short answer: held until the answer ends or grows
            pending.append(self._short[0][0])
        if self._num is not None:
            pending.append(self._num[3])
        pending += [d.pending for d in self._b64 + self._hex]
        for p in pending:
            if p is not None and p < point:
                point = p
        return point

    def _process(self, delta: str) -> None:
        base = self._raw_len
        self._raw_len += len(delta)
        self._held += delta
        norm, npos = _normalise(delta, base)

        # The words' stems and places first: a ledger piece any view finds is decided on the words
        # before it (`_resolve`), so they must be known before the views run.
        for c, p in zip(norm, npos, strict=True):
            if c in _ALNUM:
                if not self._rec:
                    self._rec_pos = p
                self._rec.append(c)
                self._rec_end = p
            elif self._rec:
                self._record_word()

        # compact and leet
        comp = [(c, p) for c, p in zip(norm, npos, strict=True) if c in _ALNUM]
        self._compact.push("".join(c for c, _ in comp), [p for _, p in comp])
        if self._bare is not None:
            self._bare += "".join(c for c, p in comp if p >= self.answer_start)
            targets = self._guard.bare_targets
            if self._bare and not any(self._bare in c or self._bare[::-1] in c for c in targets):
                self._bare = None
        if comp:
            par = self._parity
            for k in range(2):
                sub = comp[(k - par) % 2 :: 2]
                self._stride[k].push("".join(c for c, _ in sub), [p for _, p in sub])
            self._parity = (par + len(comp)) % 2
        leet = [(_LEET_PRE.get(c, c), p) for c, p in zip(norm, npos, strict=True)]
        leet = [(c, p) for c, p in leet if c in _ALNUM]
        self._leet.push(_leet("".join(c for c, _ in leet)), [p for _, p in leet])

        # words: Rouge-L and the spelled view
        for c, p in zip(norm, npos, strict=True):
            if c in _ALNUM:
                if not self._word:
                    self._word_pos = p
                self._word.append(c)
                self._word_chars.append(p)
            else:
                if self._word:
                    w = "".join(self._word)
                    self._word_done(w, self._word_pos)
                    self._word, self._word_chars = [], []
                if c == "\n":
                    self._end_line()

        # base64 from the raw characters (it is case-sensitive)
        b64 = [(c, base + i) for i, c in enumerate(delta) if c in _B64_CHARS]
        if b64:
            chars = "".join(c for c, _ in b64).translate(_B64_URLSAFE)
            pos = [p for _, p in b64]
            for d in self._b64:
                d.push(chars, pos)

        # hex from the normalised ones, "0x" prefixes dropped
        hx_c: list[str] = []
        hx_p: list[int] = []
        for c, p in zip(norm, npos, strict=True):
            if self._hex_zero is not None:
                zero, self._hex_zero = self._hex_zero, None
                if c == "x":
                    continue
                hx_c.append("0")
                hx_p.append(zero)
            if c == "0":
                self._hex_zero = p
            elif c in _HEX_CHARS:
                hx_c.append(c)
                hx_p.append(p)
        if hx_c:
            chars = "".join(hx_c)
            for d in self._hex:
                d.push(chars, hx_p)
        self._resolve()


class LeakageGuard:
    """The leakage guard of one protected prompt; build once, use for every request.

    Thresholds (keyword-only; the defaults were calibrated on bench/llm, see bench/LLM.md):

    - `overlap_threshold` (0.15): share of the prompt's distinct `kgram_chars`-grams (20
      separator-free characters, about four words) that refuses an answer.
    - `rouge_l_threshold` (0.5): Rouge-L recall of the prompt's content words that refuses one.
    - `fragment_fraction` (0.5), `min_fragment_chars` (5): a secret fragment of
      `max(min_fragment_chars, ceil(fragment_fraction * len))` characters refuses an answer.
    - `canary_chars` (10): the canary's length, from a 32-letter alphabet (50 bits).

    Raises `ConfigError` if a secret has fewer than 4 letters or digits (it would refuse ordinary
    text), or if the prompt has no text to protect. `random_choice` (default `secrets.choice`) is
    injected for tests.
    """

    CANARY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/i/l: the leet view folds them

    def __init__(
        self,
        prompt: ProtectedPrompt,
        *,
        overlap_threshold: float = 0.15,
        rouge_l_threshold: float = 0.5,
        kgram_chars: int = 20,
        fragment_fraction: float = 0.5,
        min_fragment_chars: int = 5,
        canary_chars: int = 10,
        random_choice: Callable[[str], str] = _secrets.choice,
    ) -> None:
        if not 0 < overlap_threshold <= 1 or not 0 < rouge_l_threshold <= 1:
            raise ConfigError("leakage guard thresholds must be in (0, 1]")
        if kgram_chars < 8 or min_fragment_chars < 4 or canary_chars < 8:
            raise ConfigError("leakage guard: kgram_chars >= 8, min_fragment_chars >= 4, canary_chars >= 8")
        self.prompt_name = prompt.name
        self._text = prompt.text
        self.overlap_threshold = overlap_threshold
        self.rouge_l_threshold = rouge_l_threshold
        self.kgram_chars = kgram_chars
        self.canary_chars = canary_chars
        self._choice = random_choice

        compact = _compact(prompt.text)
        grams = sorted({compact[i : i + kgram_chars] for i in range(len(compact) - kgram_chars + 1)})
        if not grams:
            raise ConfigError(f"protected prompt {prompt.name!r}: too short to protect by overlap")
        self.kgram_count = len(grams)
        words = [w for w in _words(prompt.text) if w not in _STOPWORDS]
        self.content_words = words
        self.content_word_count = max(1, len(words))

        # Words that anchor a ledger piece (`StreamScanner._resolve`), as stems: the prompt's names
        # for its secrets ("vault override code", "settlement account"), position words, and the
        # secrets' own plain words ("granite" before "36").
        plain = {w for s in prompt.secrets for w in _words(s) if not _protected(w) and w not in _STOPWORDS}
        # Of a phrase, the words before its head ("vault override", "settlement"): the head ("code",
        # "account") is an everyday word of a bank's answers; a one-word phrase is its own name.
        named = {w for ph in ProtectedTerms.from_prompt(prompt).phrases for w in (ph[:-1] or ph)}
        self.anchor_stems = frozenset(named | {_stem(w) for w in (*_POSITION_WORDS, *plain)})

        # The ledger's key: the prompt's digest and the secret's index, never the secret's text.
        self.ledger_key = prompt.digest
        self.secret_lengths: list[int] = []
        self.bare_targets: list[str] = []  # each secret's separator-free form, for bare answers
        self.protected_masks: list[tuple[int, ...]] = []
        self.ordered: list[tuple[str, ...]] = []
        # Standalone number tokens of 2+ digits that are a piece of a protected component with
        # digits -> ((secret id, bitmap of its positions), ...); and those components, for "36x4".
        self.number_pieces: dict[str, tuple[tuple[int, int], ...]] = {}
        self.digit_components: list[tuple[int, str, int]] = []  # (secret id, component, offset)
        fragments: set[str] = set()
        components: set[str] = set()
        units: list[tuple[str, int, int]] = []  # (piece, secret id, bitmap of its positions)
        for sid, s in enumerate(prompt.secrets):
            parts = [w for w in (_compact(w) for w in re.split(r"[\W_]+", s)) if w]
            c = "".join(parts)
            if len(c) < 4:
                raise ConfigError(
                    f"protected prompt {prompt.name!r}: a declared secret has fewer than 4 letters or digits"
                )
            m = min(len(c), max(min_fragment_chars, math.ceil(fragment_fraction * len(c))))
            self.secret_lengths.append(len(c))
            self.bare_targets.append(c)
            self._pieces_of(sid, parts, m, components, units)
            if len(c) >= 10:  # every other character: "KSRL73ETE / ETE84KSRL" (half the secret each)
                fragments.update((c[0::2], c[1::2]))
            content = tuple(w for w in parts if w not in _STOPWORDS)
            if len(content) >= 2:
                self.ordered += [content, content[::-1]]
            # A fragment of a secret of several words must cross a word boundary: "lighthouse" alone
            # is an ordinary word, "obsidianl" is the secret.
            # The words in reverse order too ("say the words in reverse order"), words split at
            # spaces ("K-17" one word) and at every separator.
            spaced = [w for w in (_compact(w) for w in s.split()) if w]
            for ps in (parts, parts[::-1], spaced[::-1]) if len(parts) > 1 else (parts,):
                c = "".join(ps)
                word_of = [i for i, w in enumerate(ps) for _ in w]
                fragments.update(
                    c[i : i + m]
                    for i in range(len(c) - m + 1)
                    if len(ps) == 1 or m == len(c) or word_of[i] != word_of[i + m - 1]
                )
        self.fragment_lengths = sorted({len(f) for f in fragments})

        self.main_table = _Table()
        self.leet_table = _Table()
        self.dec_table = _Table()
        for f in fragments | components:
            self.main_table.add_exact(_variants(f, shifts=True), "secret")
            # Leet folds digits into letters: a 4-digit component would read as ordinary words
            # ("0517" as "osit", in "position"), so short ones are left out of that view.
            if f in fragments or len(f) >= 6:
                self.leet_table.add_exact(_variants(_leet(f), shifts=False), "secret")
            self.dec_table.add_exact(_variants(f, shifts=False), "secret")
        for piece, sid, mask in units:
            # Caesar shifts and leet only for long pieces: three letters shifted 26 ways match
            # ordinary trigrams ("ant", "bou"), which would fill benign principals' ledgers.
            long = len(piece) >= 6
            self.main_table.add_reveal(_variants(piece, shifts=long), sid, mask)
            if long:
                self.leet_table.add_reveal(_variants(_leet(piece), shifts=False), sid, mask)
            self.dec_table.add_reveal(_variants(piece, shifts=False), sid, mask)
        for i, g in enumerate(grams):
            for v in _variants(g, shifts=True):
                self.main_table.add_kgram(v, i)
            for v in _variants(_leet(g), shifts=False):
                self.leet_table.add_kgram(v, i)
            for v in _variants(g, shifts=False):
                self.dec_table.add_kgram(v, i)

    def _pieces_of(
        self, sid: int, parts: list[str], m: int, components: set[str], units: list[tuple[str, int, int]]
    ) -> None:
        """The protected components of one secret (refused alone) and the pieces that count toward
        the ledger: runs of 3 characters inside a protected component, and runs across a boundary
        between two components that are not stop words, with at least 3 characters of a plain
        side (or all of it, if shorter) and 1 of a protected side, shorter than `m` (from `m` on,
        a run across a boundary is refused on its own)."""
        offs = [sum(len(w) for w in parts[:j]) for j in range(len(parts))]
        prot = [_protected(w) for w in parts]
        masks = []
        for w, o, pr in zip(parts, offs, prot, strict=True):
            if pr:
                components.add(w)
                masks.append(((1 << len(w)) - 1) << o)
                units += [(w[i : i + 3], sid, 0b111 << (o + i)) for i in range(len(w) - 2)]
        self.protected_masks.append(tuple(masks))
        for w, o, pr in zip(parts, offs, prot, strict=True):
            if pr and any(ch.isdigit() for ch in w):
                self.digit_components.append((sid, w, o))
                # Number tokens ("36", "thirty-six") of 2+ digits inside it, at every occurrence.
                for i in range(len(w) - 1):
                    for j in range(i + 2, len(w) + 1):
                        if not w[i:j].isdigit():
                            break
                        old = dict(self.number_pieces.get(w[i:j], ()))
                        old[sid] = old.get(sid, 0) | ((1 << (j - i)) - 1) << (o + i)
                        self.number_pieces[w[i:j]] = tuple(old.items())
        for j in range(len(parts) - 1):
            a, b, o = parts[j], parts[j + 1], offs[j + 1]
            if a in _STOPWORDS or b in _STOPWORDS:
                continue  # "of the" would be read in every benign answer
            kmin = 1 if prot[j] else min(3, len(a))
            jmin = 1 if prot[j + 1] else min(3, len(b))
            for k in range(kmin, len(a) + 1):
                for n in range(jmin, len(b) + 1):
                    # Two protected sides: any 3 characters ("1|05" of "5001 0517") are the secret's.
                    if (3 if prot[j] and prot[j + 1] else 4) <= k + n < m:
                        units.append((a[-k:] + b[:n], sid, ((1 << (k + n)) - 1) << (o - k)))

    def plant_canary(self) -> tuple[str, str]:
        """The prompt text with a fresh random canary planted after it, and the canary.

        Returns (system message text, canary); the canary is `canary_chars` characters (10: about
        six tokens) and is passed to `check`/`stream` for this request only. Only at the end: a
        canary at the start changed the prompt's first tokens every request, so the model's prompt
        cache could never be reused (measured: +1.4 s to the first token at one thread, bench/LLM.md);
        the prompt itself is read by the overlap and Rouge-L detectors wherever a dump starts.
        """
        canary = "".join(self._choice(self.CANARY_ALPHABET) for _ in range(self.canary_chars))
        text = f"{self._text}\nReference {canary}."
        return text, canary

    def stream(self, canary: str, *, revealed: Revealed | None = None, prefix: str = "") -> StreamScanner:
        """A scanner for one streamed answer to a request that was sent `canary`.

        `revealed`: the principal's ledger (see `Revealed`); read while the answer streams, and
        added to as text is released by `feed`/`finish`: the pieces in released text count even if
        the stream is then dropped (`finish()` never called) or refused. `prefix`: text the answer
        continues, i.e. a final assistant message the client sent (a prefill); it is read by every
        view so that a piece the answer completes is seen whole, but never released, and no match
        that ends inside it is a verdict (the client wrote it: refusing would be a guessing oracle).
        """
        return StreamScanner(self, canary, revealed=revealed, prefix=prefix)

    def check(self, text: str, canary: str, *, revealed: Revealed | None = None, prefix: str = "") -> None:
        """Return None if `text` (a whole answer) leaks nothing, else raise `LeakDetected`.

        `revealed` and `prefix` as for `stream`, except that the answer's pieces are added to
        `revealed` only when it passes (a refused whole answer is withheld whole).
        """
        scanner = self.stream(canary, revealed=revealed, prefix=prefix)
        scanner._defer = True  # nothing of a refused whole answer is sent: no piece is counted
        scanner.feed(text)
        scanner.finish()


def _continues(a: int, b: int) -> bool:
    """Whether two pieces' positions (bitmaps) are disjoint and join into one run of the secret:
    "36" then "74" of "3674"; not "00" twice, "00" beside an unrelated "17", nor two overlapping
    reads of one run of digits ("12:00 PM - 1:00" read as "1200100")."""
    u = a | b
    run = u >> ((u & -u).bit_length() - 1)
    return a & b == 0 and run & (run + 1) == 0


def _protected(w: str) -> bool:
    """Whether a secret's component carries entropy of its own, and so is refused alone.

    At least 4 characters and: digits (all, or mixed with letters: "8743", "4f9a8c2e", "de44"),
    except a 4-digit year 1900-2099 (7 bits, and in many benign answers: "2024"); or letters with
    no vowel ("xkqz"). Any other run of letters is taken for a dictionary-like word ("kestrel",
    "velvet", "protocol"): its entropy is the word list's, a few bits, and refusing it would refuse
    ordinary prose; such words are protected together (fragments, order, the ledger), not alone.
    """
    if len(w) < 4:
        return False
    if w.isdigit():
        return not (len(w) == 4 and w[:2] in ("19", "20"))
    return any(ch.isdigit() for ch in w) or not any(v in w for v in "aeiouy")


class Revealed:
    """One principal's ledger of secret positions its answers revealed, over requests.

    The caller keeps one per principal (and model, or not: keys carry the prompt's digest) and
    passes it to `LeakageGuard.check`/`stream`. Each key is (prompt digest, secret index) and its
    value a bitmap of positions in the secret's separator-free form: no secret text is stored.
    Bounded: at most `max_secrets` keys (least recently used dropped first; dropping forgets, so
    size it above the number of secrets a principal can reach). Not thread-safe: concurrent answers
    of one principal are each checked against the ledger as it stood while they streamed.
    """

    def __init__(self, *, max_secrets: int = 256) -> None:
        if max_secrets < 1:
            raise ValueError("max_secrets must be at least 1")
        self._bits: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._max = max_secrets

    def bits(self, key: tuple[str, int]) -> int:
        """The positions revealed so far of one secret, as a bitmap (0 if none)."""
        return self._bits.get(key, 0)

    def add(self, key: tuple[str, int], mask: int) -> None:
        """Add revealed positions (a bitmap) of one secret."""
        if not mask:
            return
        self._bits[key] = self._bits.get(key, 0) | mask
        self._bits.move_to_end(key)
        while len(self._bits) > self._max:
            self._bits.popitem(last=False)

    def items(self) -> list[tuple[tuple[str, int], int]]:
        """Every (key, bitmap), least recently used first (a shared store saves and merges them)."""
        return list(self._bits.items())

    def __len__(self) -> int:
        return len(self._bits)
