"""Canary rollout with automatic rollback.

Unversioned requests for a model with a rollout go to the canary with probability
`canary_weight`, else to the stable version; a request naming a version gets that
version. Only the server's own evidence about the canary is observed: requests the
rollout routed to it (never a request naming its version: a client could flood those
to trigger or dilute a rollback) that reached the runtime. An error is the runtime
failing, and latency is the runtime's time for the batch divided by its rows (the batch
size is the client's choice: a time per batch would let a key with `infer` send
max-row batches until the canary's p99 crossed the threshold); a refusal of the client's
input (4xx) never reaches the runtime and is not counted, nor is its upload or audit
time. No one principal's volume outweighs the others: each weighs at most
`max_requests_per_principal` requests (default `min_requests`) at its own error rate and slow
share, so a key sending many good or fast-per-row requests cannot dilute a regression others see
(red team of issue 9, F8). When the error rate or p99 latency over the window crosses the configured
threshold, the canary's weight drops to 0
at once (requests already running finish on the version they started on: the
switch itself fails nothing), an event is audited and a metric fires.

The state lives in `state/rollouts.json`, so `bastion rollout status|promote|rollback`
can drive a running server: it rereads the file when it changes (checked at most
four times a second). With `state.backend = "redis"` or `"postgres"` it lives in the shared
records instead (`SharedRolloutStates`), checked every 0.25 s, so a rollback on one replica
(or by the CLI) holds on every replica.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

from bastion.config import RolloutSettings
from bastion.records import Records, Watch, update

log = logging.getLogger("bastion.rollout")

_CHECK_EVERY = 0.25  # seconds between looks at the state (a file stat, or a shared counter read)


@dataclass
class RolloutState:
    stable: str
    canary: str | None
    weight: float
    status: str  # "canary" | "rolled_back" | "promoted"
    reason: str = ""
    changed_at: float = 0.0


# The window is kept as `_SLICES` time slices of counts, so memory and the work per request stay
# constant whatever the request rate (a list of events re-sorted per request cost O(n log n) each).
_SLICES = 32
# Per-row latencies are counted in a log-scale histogram: 16 buckets per doubling from 1 ns, 40
# doublings (to about 1100 s). It only reports the p99's value; the verdict itself is exact.
_PER_OCTAVE = 16
_LOWEST = 1e-9  # seconds per row
_BUCKETS = 40 * _PER_OCTAVE
# A bucket's geometric middle is within this relative error of any value in it (1 ns to 1100 s).
QUANTILE_RELATIVE_ERROR = 2 ** (1 / (2 * _PER_OCTAVE)) - 1  # about 2.2 %


def _bucket(value: float) -> int:
    if value <= _LOWEST:
        return 0
    return min(_BUCKETS - 1, int(math.log2(value / _LOWEST) * _PER_OCTAVE))


def _bucket_middle(index: int) -> float:
    return float(_LOWEST * 2 ** ((index + 0.5) / _PER_OCTAVE))


def _p99_rank(n: int) -> int:
    """The 1-based rank of the p99 among n sorted values (nearest rank, numpy's "inverted_cdf"),
    in integers: ceil(0.99 n) in floating point is off by one for some n."""
    return (99 * n + 99) // 100


# At most this many principals are told apart in one window (their counts are kept per slice);
# the requests of any further principal are counted together, as one more principal.
MAX_PRINCIPALS = 1024
_OTHERS = "\x00others"  # no principal id holds a NUL


@dataclass
class _Counts:
    requests: int = 0
    errors: int = 0
    slow: int = 0  # requests over the latency threshold


@dataclass
class _Slice:
    index: int  # floor(time / slice width)
    requests: int = 0
    errors: int = 0
    slow: int = 0
    histogram: dict[int, int] = field(default_factory=dict)  # bucket -> requests
    principals: dict[str, _Counts] = field(default_factory=dict)


class _Window:
    """A canary's routed requests over the last `span` seconds: request, error and slow counts kept
    up to date in O(1) per request (amortised), and a histogram of per-row latencies for the p99's value.

    The window moves in steps of span / 32, so it holds between 31/32 of `span` and `span`.
    `slow_above`: the latency threshold in seconds per row (None: latency is not judged).

    `cap`: the most requests one principal weighs in the verdict (None: no cap). A principal with n
    requests in the window, e of them failed and s slow, weighs w = min(n, cap), counting w·e/n
    errors and w·s/n slow requests: its own error rate and slow share over all its requests, at no
    more than `cap` requests' weight, so no one principal's volume outweighs `cap` requests of the
    others. `weight`, `weighted_errors` and `weighted_slow` are those sums; with no principal over the
    cap they are the plain counts (integers, exact). `requests`, `errors`, `slow`: the plain counts.
    """

    def __init__(self, span: float, slow_above: float | None, cap: int | None = None) -> None:
        self._width = span / _SLICES
        self._slow_above = slow_above
        self._cap = cap
        self._slices: deque[_Slice] = deque()
        self._principals: dict[str, _Counts] = {}
        self.requests = self.errors = self.slow = 0
        self.weight = 0
        self.weighted_errors = self.weighted_slow = 0.0

    @property
    def principals(self) -> int:
        return len(self._principals)

    def _weighed(self, c: _Counts) -> tuple[int, float, float]:
        if self._cap is None or c.requests <= self._cap:
            return c.requests, float(c.errors), float(c.slow)
        return self._cap, c.errors * self._cap / c.requests, c.slow * self._cap / c.requests

    def _expire(self, index: int) -> None:
        expired = False
        while self._slices and self._slices[0].index <= index - _SLICES:
            old = self._slices.popleft()
            self.requests -= old.requests
            self.errors -= old.errors
            self.slow -= old.slow
            for who, gone in old.principals.items():
                c = self._principals[who]
                c.requests, c.errors, c.slow = (
                    c.requests - gone.requests,
                    c.errors - gone.errors,
                    c.slow - gone.slow,
                )
                if c.requests == 0:
                    del self._principals[who]
            expired = True
        if expired:  # the weighted sums afresh, O(principals): no drift from adding and taking floats
            weighed = [self._weighed(c) for c in self._principals.values()]
            self.weight = sum(w for w, _, _ in weighed)
            self.weighted_errors = math.fsum(e for _, e, _ in weighed)
            self.weighted_slow = math.fsum(s for _, _, s in weighed)

    def add(self, now: float, error: bool, per_row: float, principal: str = "") -> None:
        index = math.floor(now / self._width)
        if self._slices and index < self._slices[-1].index:
            index = self._slices[-1].index  # the clock stepped back: count it in the newest slice
        self._expire(index)
        if not self._slices or self._slices[-1].index != index:
            self._slices.append(_Slice(index))
        current = self._slices[-1]
        slow = self._slow_above is not None and per_row > self._slow_above
        current.requests += 1
        current.errors += error
        current.slow += slow
        self.requests += 1
        self.errors += error
        self.slow += slow
        bucket = _bucket(per_row)
        current.histogram[bucket] = current.histogram.get(bucket, 0) + 1
        if principal not in self._principals and len(self._principals) >= MAX_PRINCIPALS:
            principal = _OTHERS
        mine = self._principals.setdefault(principal, _Counts())
        w0, e0, s0 = self._weighed(mine)
        mine.requests += 1
        mine.errors += error
        mine.slow += slow
        w1, e1, s1 = self._weighed(mine)
        self.weight += w1 - w0
        self.weighted_errors += e1 - e0
        self.weighted_slow += s1 - s0
        here = current.principals.setdefault(principal, _Counts())
        here.requests += 1
        here.errors += error
        here.slow += slow

    def errors_over(self, rate: float) -> bool:
        """Whether the weighted share of failed requests exceeds `rate`."""
        return self._over(self.weighted_errors, Fraction(rate), lambda c: c.errors)

    def p99_over_threshold(self) -> bool:
        """Whether the p99 of the window's per-row latencies, each principal weighing at most `cap`
        requests, exceeds `slow_above`. The nearest-rank p99 of n values is over the threshold exactly
        when more than n/100 of them are (so the histogram is not consulted)."""
        return self._over(self.weighted_slow, Fraction(1, 100), lambda c: c.slow)

    def _over(self, weighted: float, share: Fraction, count: Callable[[_Counts], int]) -> bool:
        """weighted / weight > share, exactly: the float sums decide unless they are within rounding
        of the bound, and then the sum is redone in fractions, O(principals)."""
        if self.weight == 0:
            return False
        bound = float(share) * self.weight
        if abs(weighted - bound) > 1e-9 * max(1.0, bound):
            return weighted > bound
        cap = self._cap
        exact = sum(
            (
                Fraction(count(c))
                if cap is None or c.requests <= cap
                else Fraction(count(c) * cap, c.requests)
                for c in self._principals.values()
            ),
            Fraction(0),
        )
        return exact > share * self.weight

    def p99(self) -> float:
        """The p99 of all the window's per-row latencies (unweighted) in seconds, within
        QUANTILE_RELATIVE_ERROR (for 1 ns to 1100 s per row); O(buckets in use), so called only for a
        verdict's report. Raises ValueError on an empty window."""
        if self.requests == 0:
            raise ValueError("no requests in the window")
        merged: dict[int, int] = {}
        for s in self._slices:
            for bucket, count in s.histogram.items():
                merged[bucket] = merged.get(bucket, 0) + count
        rank, seen = _p99_rank(self.requests), 0
        for bucket in sorted(merged):
            seen += merged[bucket]
            if seen >= rank:
                return _bucket_middle(bucket)
        raise AssertionError("the histogram holds fewer requests than the window")  # pragma: no cover


@dataclass(frozen=True)
class Rollback:
    model: str
    version: str
    reason: str
    detail: str


def _cap(settings: RolloutSettings) -> int:
    """The most requests one principal weighs in a canary's verdict."""
    cap = settings.max_requests_per_principal
    return settings.min_requests if cap is None else cap


def _unit_random() -> float:
    return secrets.randbits(32) / 2**32


class RolloutStateStore(Protocol):
    """Where rollout decisions are kept between requests, restarts and replicas."""

    def load(self) -> dict[str, RolloutState]: ...

    def save(self, states: dict[str, RolloutState]) -> None:
        """Write the states of the models this process runs rollouts for."""
        ...

    def changed(self) -> bool:
        """Whether another writer saved since this store last loaded or saved (cheap; called at
        most once a second per server). May raise `StateUnavailable`."""
        ...


class FileRolloutStates:
    """`rollouts.json` in the state directory (one host); a change is seen by its mtime."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None

    def load(self) -> dict[str, RolloutState]:
        try:
            self._mtime = self.path.stat().st_mtime
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return {m: RolloutState(**s) for m, s in raw.items()}
        except (FileNotFoundError, ValueError, TypeError):
            return {}

    def save(self, states: dict[str, RolloutState]) -> None:
        save_states(self.path, states)  # the whole file: one server owns its state directory
        self._mtime = self.path.stat().st_mtime

    def changed(self) -> bool:
        try:
            return self.path.stat().st_mtime != self._mtime
        except FileNotFoundError:
            return False


_ROLLOUTS = "rollouts"  # the shared collection: model -> RolloutState as a dict


class SharedRolloutStates:
    """Rollout states in Redis or PostgreSQL (`bastion.records`): one record per model, written only
    when this process changed it (a replica does not write back another's decision it has not read
    yet); a change is seen by the collection's counter (read at most every 0.25 s)."""

    def __init__(self, records: Records) -> None:
        self._records = records
        self._watch = Watch(records, _ROLLOUTS)
        self._known: dict[str, dict[str, Any]] = {}

    def load(self) -> dict[str, RolloutState]:
        self._watch.invalidate()
        self._watch.stale()  # read the counter first: what is read next is at least that new
        self._known = {m: json.loads(s) for m, s in self._records.items(_ROLLOUTS).items()}
        return {m: RolloutState(**s) for m, s in self._known.items()}

    def save(self, states: dict[str, RolloutState]) -> None:
        for model, state in states.items():
            new = asdict(state)
            if self._known.get(model) != new:
                update(self._records, _ROLLOUTS, model, lambda _, new=new: new)  # type: ignore[misc]
                self._known[model] = new

    def changed(self) -> bool:
        return self._watch.stale()


class Rollouts:
    def __init__(
        self,
        settings: dict[str, RolloutSettings],
        state: Path | RolloutStateStore,
        *,
        served: Callable[[str, str], bool],
        clock: Callable[[], float],
        random: Callable[[], float] = _unit_random,
    ) -> None:
        self._settings = settings
        self._store: RolloutStateStore = FileRolloutStates(state) if isinstance(state, Path) else state
        self._clock = clock
        self._random = random
        self._windows: dict[str, _Window] = {}
        self._checked_at = 0.0
        self.states = self._initial_states(served) if settings else {}
        self._store.save(self.states)

    def _initial_states(self, served: Callable[[str, str], bool]) -> dict[str, RolloutState]:
        saved = self._store.load()
        states = {}
        for model, s in self._settings.items():
            state = RolloutState(
                s.stable, s.canary, s.canary_weight if s.canary else 0.0, "canary", "", self._clock()
            )
            old = saved.get(model)
            # A decision taken at run time (rollback, promotion) outlives a restart for the same pair.
            if old is not None and (old.stable, old.canary) in {(s.stable, s.canary), (s.canary, None)}:
                state = old
            if state.canary is not None and not served(model, state.canary):
                state.weight, state.status = 0.0, "rolled_back"
                state.reason = "canary refused at load (see the model_load audit record)"
            states[model] = state
        return states

    # -- request path ---------------------------------------------------------------------------

    def pick(self, model: str) -> str | None:
        """The version an unversioned request for `model` goes to (None: no rollout, newest version)."""
        self._maybe_reload()
        state = self.states.get(model)
        if state is None:
            return None
        if state.canary is not None and state.weight > 0 and self._random() < state.weight:
            return state.canary
        return state.stable

    def stable(self, model: str) -> str | None:
        """The stable version of a model under a rollout (None: no rollout)."""
        state = self.states.get(model)
        return None if state is None else state.stable

    def observe(
        self,
        model: str,
        version: str,
        *,
        principal: str,
        routed: bool,
        inference_seconds: float | None,
        rows: int,
        failed: bool,
    ) -> Rollback | None:
        """Record one request; return a Rollback when this one tipped the canary over a threshold.

        `principal`: who sent it (its id); one principal weighs at most `max_requests_per_principal`
        requests in the verdict. `routed`: the rollout chose `version` for it. `inference_seconds`:
        the runtime's time for the batch, None if the runtime never ran (the request was refused
        before it: not evidence). `rows`: the batch's rows; latency is judged per row, since the
        client chooses the batch size. `failed`: the runtime raised. O(1) per request (amortised).
        """
        if not routed or inference_seconds is None:
            return None
        state = self.states.get(model)
        if state is None or version != state.canary or state.weight == 0:
            return None
        settings = self._settings[model]
        window = self._windows.get(model)
        if window is None:
            limit = settings.max_p99_latency_ms
            slow_above = None if limit is None else limit / 1000
            window = self._windows[model] = _Window(settings.window_seconds, slow_above, _cap(settings))
        window.add(self._clock(), failed, inference_seconds / max(rows, 1), principal)
        if window.weight < settings.min_requests:
            return None
        n, weight = window.requests, window.weight
        # Some principal sent more than the cap beside others: say how the evidence was weighed.
        capped = weight != n and window.principals > 1
        if window.errors_over(settings.max_error_rate):
            detail = f"{window.errors} of {n} canary requests failed"
            if capped:
                detail = (
                    f"{window.weighted_errors:.3g} of {weight} canary requests failed, each principal"
                    f" counted for at most {_cap(settings)} ({detail}; {window.principals} principals)"
                )
            return self._roll_back(model, "error_rate", detail)
        if settings.max_p99_latency_ms is not None and window.p99_over_threshold():
            over = f"{settings.max_p99_latency_ms:g} ms"
            detail = f"canary p99 {window.p99() * 1000:.3g} ms per row over {over} ({window.slow} of {n} requests over)"
            if capped:
                detail = (
                    f"canary p99 per row over {over}: {window.weighted_slow:.3g} of {weight} requests over,"
                    f" each principal counted for at most {_cap(settings)} ({window.slow} of {n} requests over,"
                    f" p99 of them all {window.p99() * 1000:.3g} ms; {window.principals} principals)"
                )
            return self._roll_back(model, "latency", detail)
        return None

    # -- operator actions -----------------------------------------------------------------------

    def _roll_back(self, model: str, reason: str, detail: str) -> Rollback:
        state = self.states[model]
        assert state.canary is not None
        state.weight, state.status, state.reason, state.changed_at = 0.0, "rolled_back", detail, self._clock()
        self._windows.pop(model, None)
        self._store.save(self.states)
        log.warning("rolled back %s version %s: %s", model, state.canary, detail)
        return Rollback(model, state.canary, reason, detail)

    def _maybe_reload(self) -> None:
        if not self.states:
            return
        now = self._clock()
        if now - self._checked_at < _CHECK_EVERY:
            return
        if self._store.changed():  # StateUnavailable from a shared store: the request gets 503
            for model, state in self._store.load().items():
                if model in self.states:
                    self.states[model] = state
        self._checked_at = now


def save_states(path: Path, states: dict[str, RolloutState]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps({m: asdict(s) for m, s in states.items()}, indent=2) + "\n"
    # Owner-only whatever the process umask (an embedding caller's may be 022), like all of state/.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover tmp file keeps its old mode under O_CREAT
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic: the server never reads half a file


def load_states(path: Path) -> dict[str, RolloutState]:
    try:
        return {m: RolloutState(**s) for m, s in json.loads(path.read_text(encoding="utf-8")).items()}
    except FileNotFoundError:
        return {}
