"""Canary rollout with automatic rollback.

Unversioned requests for a model with a rollout go to the canary with probability
`canary_weight`, else to the stable version; a request naming a version gets that
version. Only the server's own evidence about the canary is observed: requests the
rollout routed to it (never a request naming its version: a client could flood those
to trigger or dilute a rollback) that reached the runtime. An error is the runtime
failing, and latency is the runtime's time for the batch; a refusal of the client's
input (4xx) never reaches the runtime and is not counted, nor is its upload or audit
time. When the error rate or p99 latency over the window crosses the configured
threshold, the canary's weight drops to 0
at once (requests already running finish on the version they started on: the
switch itself fails nothing), an event is audited and a metric fires.

The state lives in `state/rollouts.json`, so `bastion rollout status|promote|rollback`
can drive a running server: it rereads the file when it changes (checked at most
once a second).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bastion.config import RolloutSettings

log = logging.getLogger("bastion.rollout")

_CHECK_EVERY = 1.0  # seconds between looks at the state file


@dataclass
class RolloutState:
    stable: str
    canary: str | None
    weight: float
    status: str  # "canary" | "rolled_back" | "promoted"
    reason: str = ""
    changed_at: float = 0.0


@dataclass
class _Window:
    events: deque[tuple[float, bool, float]] = field(default_factory=deque)  # (time, error, latency s)

    def add(self, now: float, error: bool, latency: float, span: float) -> None:
        self.events.append((now, error, latency))
        while self.events and self.events[0][0] < now - span:
            self.events.popleft()


@dataclass(frozen=True)
class Rollback:
    model: str
    version: str
    reason: str
    detail: str


def _unit_random() -> float:
    return secrets.randbits(32) / 2**32


class Rollouts:
    def __init__(
        self,
        settings: dict[str, RolloutSettings],
        state_path: Path,
        *,
        served: Callable[[str, str], bool],
        clock: Callable[[], float],
        random: Callable[[], float] = _unit_random,
    ) -> None:
        self._settings = settings
        self._path = state_path
        self._clock = clock
        self._random = random
        self._windows: dict[str, _Window] = {}
        self._file_mtime = 0.0
        self._checked_at = 0.0
        self.states = self._initial_states(served)
        self._save()

    def _initial_states(self, served: Callable[[str, str], bool]) -> dict[str, RolloutState]:
        saved = self._read()
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

    def observe(
        self, model: str, version: str, *, routed: bool, inference_seconds: float | None, failed: bool
    ) -> Rollback | None:
        """Record one request; return a Rollback when this one tipped the canary over a threshold.

        `routed`: the rollout chose `version` for it. `inference_seconds`: the runtime's time for the
        batch, None if the runtime never ran (the request was refused before it: not evidence).
        `failed`: the runtime raised.
        """
        if not routed or inference_seconds is None:
            return None
        state = self.states.get(model)
        if state is None or version != state.canary or state.weight == 0:
            return None
        error, latency = failed, inference_seconds
        settings = self._settings[model]
        window = self._windows.setdefault(model, _Window())
        window.add(self._clock(), error, latency, settings.window_seconds)
        n = len(window.events)
        if n < settings.min_requests:
            return None
        errors = sum(1 for _, e, _ in window.events if e)
        if errors / n > settings.max_error_rate:
            return self._roll_back(model, "error_rate", f"{errors} of {n} canary requests failed")
        if settings.max_p99_latency_ms is not None:
            latencies = sorted(lat for _, _, lat in window.events)
            p99 = latencies[min(n - 1, int(0.99 * n))] * 1000
            if p99 > settings.max_p99_latency_ms:
                return self._roll_back(
                    model, "latency", f"canary p99 {p99:.1f} ms over {settings.max_p99_latency_ms:g} ms"
                )
        return None

    # -- operator actions -----------------------------------------------------------------------

    def _roll_back(self, model: str, reason: str, detail: str) -> Rollback:
        state = self.states[model]
        assert state.canary is not None
        state.weight, state.status, state.reason, state.changed_at = 0.0, "rolled_back", detail, self._clock()
        self._windows.pop(model, None)
        self._save()
        log.warning("rolled back %s version %s: %s", model, state.canary, detail)
        return Rollback(model, state.canary, reason, detail)

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked_at < _CHECK_EVERY:
            return
        self._checked_at = now
        try:
            mtime = self._path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime != self._file_mtime:
            for model, state in self._read().items():
                if model in self.states:
                    self.states[model] = state
            self._file_mtime = mtime

    def _read(self) -> dict[str, RolloutState]:
        try:
            raw = json.loads(self._path.read_text(encoding="utf-8"))
            return {m: RolloutState(**s) for m, s in raw.items()}
        except (FileNotFoundError, ValueError, TypeError):
            return {}

    def _save(self) -> None:
        save_states(self._path, self.states)
        self._file_mtime = self._path.stat().st_mtime


def save_states(path: Path, states: dict[str, RolloutState]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({m: asdict(s) for m, s in states.items()}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: the server never reads half a file


def load_states(path: Path) -> dict[str, RolloutState]:
    try:
        return {m: RolloutState(**s) for m, s in json.loads(path.read_text(encoding="utf-8")).items()}
    except FileNotFoundError:
        return {}
