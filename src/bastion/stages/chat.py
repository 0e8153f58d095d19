"""Language-model stages (`/v1/chat/completions`), in pipeline order.

- `DecodeChat`: the body under the principal's roles' byte cap, as a well-formed chat request.
- `AuthorizeChat`: the model is a served language model (404) and granted `chat` (403).
- `ComposeChat`: the client's messages under policy (a client system message refused or demoted;
  message count and max_tokens capped by role and model; PII and secrets redacted where the model
  says), and their prompt tokens counted with the protected prompt (400 over the context).
- `WatchPrompts`: query auditing for prompt extraction: intent signals on the client's messages,
  and guard hits, per principal and model; past the threshold an incident and the key quarantined.
- `ReserveTokens`: prompt tokens + max_tokens charged to the principal's token budget (429).
- `Generate`: the backend under the model's concurrency gate, the protected prompt first with a fresh
  canary, every answer read by the leakage guard before any byte leaves; unused tokens refunded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from bastion.config import Action, ChatLimits
from bastion.context import ChatExchange, RequestContext
from bastion.errors import (
    BadRequest,
    ErrorCode,
    NotFound,
    OutputWithheld,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
)
from bastion.incidents import IncidentRecords
from bastion.keys import KeyRecords
from bastion.llm.intent import Escalation, ExtractionTracker, screen_intent
from bastion.llm.leakage import LeakDetected, Revealed
from bastion.llm.models import ChatModel
from bastion.llm.protocol import decode_chat_request
from bastion.llm.types import ChatMessage, Completion, GenerationParams, StreamEnd, Usage
from bastion.metrics import Metrics
from bastion.policy import Policy
from bastion.query_history import SharedLedgers, SharedTracker
from bastion.stages.query_audit import quarantined
from bastion.state import BudgetKey, StateStore

if TYPE_CHECKING:
    from bastion.llm.redaction import Redactor

log = logging.getLogger("bastion.llm")

# The token budget's ledger scope: over every language model (a model name never holds "*").
TOKEN_SCOPE = "*/tokens"  # noqa: S105 (a ledger scope, not a secret)


class ChatPolicy:
    """Each principal's chat caps: with several roles the most generous of each (as rate limits)."""

    def __init__(self, policy: Policy, max_body_bytes: int) -> None:
        self._policy = policy
        self._max_body = max_body_bytes
        self._cache: dict[tuple[str, ...], ChatLimits] = {}

    def limits(self, roles: tuple[str, ...]) -> ChatLimits:
        found = self._cache.get(roles)
        if found is None:
            chats = [r.chat for r in (self._policy.role(n) for n in roles) if r is not None]
            found = (
                ChatLimits(
                    max_tokens=max(c.max_tokens for c in chats),
                    max_messages=max(c.max_messages for c in chats),
                    max_request_bytes=min(self._max_body, max(c.max_request_bytes for c in chats)),
                    max_prompt_tokens=max(c.max_prompt_tokens for c in chats),
                    max_in_flight=max(c.max_in_flight for c in chats),
                    token_budget=max(c.token_budget for c in chats),
                    token_budget_window_seconds=max(c.token_budget_window_seconds for c in chats),
                )
                if chats
                else ChatLimits(max_request_bytes=min(self._max_body, ChatLimits().max_request_bytes))
            )
            self._cache[roles] = found
        return found


class DecodeChat:
    def __init__(self, chat_policy: ChatPolicy) -> None:
        self._chat_policy = chat_policy

    async def __call__(self, ctx: RequestContext) -> None:
        assert ctx.principal is not None, "DecodeChat runs after Authenticate"
        limits = self._chat_policy.limits(ctx.principal.roles)
        ctx.body = await ctx.read_body(limits.max_request_bytes)
        ctx.chat = ChatExchange(request=decode_chat_request(ctx.body), limits=limits)
        ctx.model_name = ctx.chat.request.model


class AuthorizeChat:
    def __init__(self, policy: Policy, models: Mapping[str, ChatModel]) -> None:
        self._policy = policy
        self._models = models

    async def __call__(self, ctx: RequestContext) -> None:
        chat, principal = ctx.chat, ctx.principal
        assert chat is not None and principal is not None
        name = chat.request.model
        model = self._models.get(name)
        if model is None:
            # The name is the client's text: not repeated (it could carry anything up to 64 characters).
            raise NotFound("this model is not served", code=ErrorCode.MODEL_NOT_FOUND)
        grant = self._policy.grant(principal.roles, name).narrowed(principal.scope, name)
        if not grant.allows(Action.CHAT):
            raise PermissionDenied(f"not permitted to chat with model {name!r}")
        chat.model = model


class LazyRedactor:
    """One `Redactor` for every model, built on first use: a server whose models redact nothing
    never loads its recognizers."""

    def __init__(self) -> None:
        self._redactor: Redactor | None = None

    def load(self) -> Redactor:
        """Build the redactor now (about a second: Presidio compiles its recognizers)."""
        if self._redactor is None:
            from bastion.llm.redaction import Redactor

            self._redactor = Redactor()
        return self._redactor

    def redact_into(self, chat: ChatExchange, text: str) -> str:
        """The text with its findings replaced; their counts added to the exchange's (audited)."""
        found = self.load().redact(text)
        for entity, count in found.counts.items():
            chat.redactions[entity] = chat.redactions.get(entity, 0) + count
        return found.text


class ComposeChat:
    """The client's messages as the model will see them after the protected prompt."""

    def __init__(self, redactor: LazyRedactor) -> None:
        self._redactor = redactor

    async def __call__(self, ctx: RequestContext) -> None:
        chat = ctx.chat
        assert chat is not None and chat.model is not None and chat.limits is not None
        model, request, limits = chat.model, chat.request, chat.limits
        if len(request.messages) > limits.max_messages:
            raise PayloadTooLarge(
                f"{len(request.messages)} messages; this role may send {limits.max_messages}",
                code=ErrorCode.TOO_MANY_MESSAGES,
            )
        cap = min(limits.max_tokens, model.settings.max_tokens)
        if request.max_tokens is not None and request.max_tokens > cap:
            raise BadRequest(
                f"max_tokens: at most {cap} for this caller and model", code=ErrorCode.MAX_TOKENS_TOO_LARGE
            )
        chat.max_tokens = request.max_tokens or cap
        messages = []
        for m in request.messages:
            if m.role == "system" and model.prompt is not None:
                # The protected prompt speaks for the operator; a client's system message cannot.
                if model.settings.client_system == "refuse":
                    raise PermissionDenied(
                        "system messages are not accepted for this model",
                        code=ErrorCode.SYSTEM_MESSAGE_REFUSED,
                    )
                m = ChatMessage("user", m.content)
            messages.append(m)
        if model.settings.redacts_input:
            messages = [ChatMessage(m.role, self._redactor.redact_into(chat, m.content)) for m in messages]
        if model.prompt is not None and messages[-1].role != "user":
            # A trailing assistant turn is a prefill: the model would continue the client's words
            # ("The escalation code is"), and a stop sequence would cut each answer to one piece.
            raise BadRequest(
                "messages: the last message must be the user's", code=ErrorCode.MALFORMED_REQUEST
            )
        chat.messages = tuple(messages)
        # Counted with the protected prompt and a canary of the real length, as the model will see it;
        # the tokenizer may be a round trip (the local model's socket): off the event loop.
        system = model.system_prompt(ctx.now)[0]
        chat.prompt_tokens = await asyncio.to_thread(
            model.backend.count_tokens, _with_prompt(model, chat.messages, system)
        )
        if chat.prompt_tokens > limits.max_prompt_tokens:
            raise PayloadTooLarge(
                f"this request is {chat.prompt_tokens} prompt tokens; this role may send {limits.max_prompt_tokens}",
                code=ErrorCode.PROMPT_TOO_LONG,
            )
        if chat.prompt_tokens + chat.max_tokens > model.settings.context_tokens:
            raise BadRequest(
                f"this request needs {chat.prompt_tokens} prompt tokens + {chat.max_tokens} completion "
                f"tokens; the model's context is {model.settings.context_tokens}",
                code=ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            )


def _with_prompt(
    model: ChatModel, messages: tuple[ChatMessage, ...], canary_text: str | None
) -> list[ChatMessage]:
    if model.prompt is None or canary_text is None:
        return list(messages)
    return [ChatMessage("system", canary_text), *messages]


class PromptContainment:
    """An escalation of prompt-extraction suspicion: an incident record (signals and counts, never a
    message) and, as the model's `extraction_watch` says, the key quarantined (403 from now on)."""

    def __init__(
        self,
        keys: KeyRecords,
        metrics: Metrics,
        record: Callable[[dict[str, Any]], None],
        tracker: ExtractionTracker,
        incidents: IncidentRecords,
    ) -> None:
        self._keys = keys
        self._tracker = tracker
        self._incidents = incidents
        self._metrics = metrics
        self._record = record

    def __call__(self, ctx: RequestContext, escalation: Escalation) -> None:
        chat, principal = ctx.chat, ctx.principal
        assert chat is not None and chat.model is not None and principal is not None
        model = chat.model
        action = model.settings.extraction_watch
        self._record(
            {
                "ts": ctx.now,
                "request_id": ctx.request_id,
                "route": "incident",
                "action": Action.CHAT.value,
                "principal": principal.id,
                "via": principal.via,
                "model": model.name,
                "prompt": model.prompt.name if model.prompt else None,
                "prompt_digest": model.prompt.digest if model.prompt else None,
                "decision": action,
                "reason": "prompt_extraction_suspected",
                "detail": escalation.reason,
                "evidence": dict(escalation.evidence),
            }
        )
        self._incidents.open(
            kind="prompt_extraction_suspected",
            model=model.name,
            principal=principal.id,
            action=action,
            detail=escalation.describe(),
            evidence={
                **escalation.evidence,
                "prompt": model.prompt.name if model.prompt else None,
                "prompt_digest": model.prompt.digest if model.prompt else None,
            },
            request_id=ctx.request_id,
            now=ctx.now,
        )
        self._metrics.incidents.labels(model.name, "prompt_extraction", action).inc()
        if action == "quarantine":
            self._keys.quarantine(principal.key_id, now=ctx.now)
            self._tracker.forget(principal.id)  # a released key starts afresh
            raise quarantined()


class WatchPrompts:
    """Intent screening of every request; the tracker decides when a principal has probed enough."""

    def __init__(
        self, tracker: ExtractionTracker, contain: PromptContainment, shared: SharedTracker | None = None
    ) -> None:
        """`shared`: the tracker's evidence in the state backend (workers, replicas; bastion.query_history)."""
        self._tracker = tracker
        self._contain = contain
        self._shared = shared

    async def __call__(self, ctx: RequestContext) -> None:
        chat = ctx.chat
        assert chat is not None and chat.model is not None
        chat.intent = screen_intent(chat.request.messages, terms=chat.model.terms)
        await self.observe(ctx, guard_hit=False)

    async def observe(self, ctx: RequestContext, *, guard_hit: bool) -> None:
        """Count this request's intent (on its way in), or a guard hit on its answer (on its way out:
        the guard's weight only, the intent was counted already)."""
        chat, principal = ctx.chat, ctx.principal
        assert (
            chat is not None and chat.model is not None and chat.intent is not None and principal is not None
        )
        if chat.model.settings.extraction_watch == "off":
            return
        if self._shared is not None:
            if guard_hit:
                escalation = await self._shared.observe_guard_hit(
                    principal.id, chat.model.name, chat.intent, now=ctx.now
                )
            else:
                escalation = await self._shared.observe(
                    principal.id, chat.model.name, chat.intent, guard_hit=False, now=ctx.now
                )
        elif guard_hit:  # charged to this request's own verdict (its intent was counted on the way in)
            escalation = self._tracker.observe_guard_hit(
                principal.id, chat.model.name, chat.intent, now=ctx.now
            )
        else:
            escalation = self._tracker.observe(
                principal.id, chat.model.name, chat.intent, guard_hit=False, now=ctx.now
            )
        if escalation is not None:
            self._contain(ctx, escalation)


class ReserveTokens:
    def __init__(self, store: StateStore) -> None:
        self._store = store

    async def __call__(self, ctx: RequestContext) -> None:
        chat, principal = ctx.chat, ctx.principal
        assert chat is not None and chat.limits is not None and principal is not None
        assert chat.model is not None
        # A model that may regenerate once after a guard hit may run twice: reserve for both.
        attempts = 2 if chat.model.prompt is not None and chat.model.settings.on_leak == "regenerate" else 1
        cost = (chat.prompt_tokens + chat.max_tokens) * attempts
        spent = await self._store.spend_budget(
            token_budget_key(principal.id, chat.limits),
            cost=cost,
            limit=chat.limits.token_budget,
            now=ctx.now,
        )
        if not spent.allowed:
            raise RateLimited(
                f"token budget exhausted: this request needs {cost} tokens, {int(spent.remaining)} are left "
                "in this window",
                retry_after=spent.retry_after,
                code=ErrorCode.TOKEN_BUDGET_EXHAUSTED,
            )
        chat.tokens_reserved = cost


def token_budget_key(principal: str, limits: ChatLimits) -> BudgetKey:
    return BudgetKey(principal, TOKEN_SCOPE, limits.token_budget_window_seconds)


class Generate:
    def __init__(
        self,
        store: StateStore,
        watch: WatchPrompts,
        redactor: LazyRedactor,
        metrics: Metrics,
        ledgers: SharedLedgers | None = None,
    ) -> None:
        """`ledgers`: the principals' `Revealed` ledgers in the state backend (workers, replicas)."""
        self._store = store
        self._watch = watch
        self._redactor = redactor
        self._metrics = metrics
        self._revealed: dict[str, Revealed] = {}
        self._ledgers = ledgers

    async def __call__(self, ctx: RequestContext) -> None:
        chat = ctx.chat
        assert chat is not None and chat.model is not None
        if chat.request.stream:
            chat.stream = self._stream(ctx)
            return
        try:
            chat.completion = await self._complete(ctx)
        finally:
            await self._refund(ctx)

    def _params(self, chat: ChatExchange, *, retry: bool = False) -> GenerationParams:
        request = chat.request
        assert chat.model is not None
        temperature = chat.model.settings.temperature if request.temperature is None else request.temperature
        if retry:  # after a guard hit: sampled (greedy decoding would give the same answer again)
            temperature = max(temperature, 0.7)
        return GenerationParams(
            max_tokens=chat.max_tokens,
            temperature=temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            # Behind a protected prompt the client's stop sequences are applied here, after the guard
            # read the whole answer: a stop the model honoured itself would tell a right guess of the
            # secret (the answer ends cleanly) from a wrong one (the model goes on and is withheld).
            stop=() if chat.model.guard is not None else request.stop,
            seed=request.seed,
        )

    async def _complete(self, ctx: RequestContext) -> Completion:
        chat = ctx.chat
        assert chat is not None and chat.model is not None
        model = chat.model
        guard = model.guard
        attempts = 2 if model.settings.on_leak == "regenerate" else 1
        ledger = await self._ledger(ctx) if guard is not None else None
        try:
            return await self._attempts(ctx, attempts, ledger)
        finally:
            await self._save_ledger(ctx, ledger)

    async def _attempts(self, ctx: RequestContext, attempts: int, ledger: Revealed | None) -> Completion:
        chat = ctx.chat
        assert chat is not None and chat.model is not None
        model = chat.model
        guard = model.guard
        async with self._slot(ctx):
            for attempt in range(attempts):
                system, canary = model.system_prompt(ctx.now, fresh=attempt > 0)
                completion = await model.backend.complete(
                    _with_prompt(model, chat.messages, system), self._params(chat, retry=attempt > 0)
                )
                chat.usage = _add(chat.usage, completion.usage)
                try:
                    if guard is not None:
                        guard.check(completion.text, canary, revealed=ledger)
                except LeakDetected as hit:
                    self._withheld(ctx, hit)
                    if attempt + 1 < attempts:
                        continue
                    await self._watch.observe(ctx, guard_hit=True)
                    raise OutputWithheld(detector=hit.detector, score=hit.score) from None
                chat.guard = None if guard is None else "pass" if attempt == 0 else "regenerated"
                chat.guard_score = None
                text, finish = completion.text, completion.finish_reason
                if guard is not None and chat.request.stop:
                    cut = StopCutter(chat.request.stop)
                    text = cut.feed(text) + cut.finish()
                    finish = "stop" if cut.stopped else finish
                chat.finish_reason = finish
                return Completion(self._redact_output(chat, text), completion.usage, finish)
        raise AssertionError("unreachable")

    def _withheld(self, ctx: RequestContext, hit: LeakDetected) -> None:
        chat = ctx.chat
        assert chat is not None and chat.model is not None
        chat.guard, chat.guard_score = hit.detector, hit.score
        if self._metrics.enabled:
            family = hit.detector.split("/", 1)[0]
            self._metrics.llm_guard_hits.labels(
                chat.model.name, family if family in _FAMILIES else "other"
            ).inc()

    def _redact_output(self, chat: ChatExchange, text: str) -> str:
        assert chat.model is not None
        if not chat.model.settings.redacts_output:
            return text
        return self._redactor.redact_into(chat, text)

    async def _stream(self, ctx: RequestContext) -> AsyncGenerator[str | StreamEnd, None]:
        chat = ctx.chat
        assert chat is not None and chat.model is not None
        model = chat.model
        guard = model.guard
        ledger = None
        try:
            async with self._slot(ctx):
                system, canary = model.system_prompt(ctx.now)
                ledger = await self._ledger(ctx) if guard is not None else None
                scanner = guard.stream(canary, revealed=ledger) if guard is not None else None
                cut = StopCutter(chat.request.stop if guard is not None else ())
                end: StreamEnd | None = None
                received = 0
                # The prompt is processed whatever happens next: a client that leaves before the first
                # token still pays for it.
                chat.usage = Usage(chat.prompt_tokens, 0)
                try:
                    async for item in model.backend.stream(
                        _with_prompt(model, chat.messages, system), self._params(chat)
                    ):
                        if isinstance(item, StreamEnd):
                            end = item
                            break
                        # Until the backend's own count arrives, a delta counts as a token: a client
                        # that goes away mid-stream pays for what was generated, not nothing.
                        received += 1
                        chat.usage = Usage(chat.prompt_tokens, received)
                        released = cut.feed(scanner.feed(item) if scanner is not None else item)
                        if released:
                            yield released
                    if end is None:
                        raise AssertionError("a backend's stream ended without its StreamEnd")
                    chat.usage = end.usage
                    rest = scanner.finish() if scanner is not None else ""
                except LeakDetected as hit:
                    self._withheld(ctx, hit)
                    await self._watch.observe(ctx, guard_hit=True)
                    raise OutputWithheld(detector=hit.detector, score=hit.score) from None
                rest = cut.feed(rest) + cut.finish()
                if rest:
                    yield rest
                chat.guard = "pass" if guard is not None else None
                chat.finish_reason = "stop" if cut.stopped else end.finish_reason
                yield StreamEnd(end.usage, "stop") if cut.stopped else end
        finally:
            try:
                await self._save_ledger(ctx, ledger)
            finally:
                await self._refund(ctx)

    async def _save_ledger(self, ctx: RequestContext, ledger: Revealed | None) -> None:
        if self._ledgers is not None and ledger is not None and ctx.principal is not None:
            await self._ledgers.save(ctx.principal.id, ledger)

    async def _ledger(self, ctx: RequestContext) -> Revealed:
        """The principal's ledger of secret positions its answers revealed, across requests (a piece
        per answer adds up): bounded, least recently used principals dropped first, in memory; or
        read from the state backend (`ledgers`), where this answer's positions are merged at its end."""
        assert ctx.principal is not None
        who = ctx.principal.id
        if self._ledgers is not None:
            return await self._ledgers.load(who)
        ledger = self._revealed.pop(who, None)
        if ledger is None:
            ledger = Revealed()
            if len(self._revealed) >= _MAX_LEDGERS:
                del self._revealed[next(iter(self._revealed))]
        self._revealed[who] = ledger  # most recently used last
        return ledger

    def _slot(self, ctx: RequestContext) -> AbstractAsyncContextManager[None]:
        chat, principal = ctx.chat, ctx.principal
        assert (
            chat is not None and chat.model is not None and chat.limits is not None and principal is not None
        )
        return chat.model.gate.slot(principal.id, chat.limits.max_in_flight)

    async def _refund(self, ctx: RequestContext) -> None:
        """Give back the reserved tokens the answer did not use (all of them if it never ran)."""
        chat, principal = ctx.chat, ctx.principal
        assert chat is not None and chat.limits is not None and principal is not None
        used = chat.usage.total_tokens if chat.usage is not None else 0
        if chat.usage is not None and chat.model is not None and self._metrics.enabled:
            self._metrics.llm_tokens.labels(chat.model.name, "prompt").inc(chat.usage.prompt_tokens)
            self._metrics.llm_tokens.labels(chat.model.name, "completion").inc(chat.usage.completion_tokens)
        unused = chat.tokens_reserved - used
        chat.tokens_reserved = used
        if unused > 0:
            await self._store.spend_budget(
                token_budget_key(principal.id, chat.limits),
                cost=-unused,
                limit=chat.limits.token_budget,
                now=ctx.now,
            )


# Principals whose revealed-positions ledgers are kept (a few hundred bytes each).
_MAX_LEDGERS = 10_000

# The leakage guard's detector families: the metric's label set (a detector's full name is audited).
_FAMILIES = frozenset({"canary", "secret", "overlap", "rouge_l"})


class StopCutter:
    """The client's stop sequences applied to text as it is released: text before the first stop is
    passed on (holding back only what could be the start of a stop sequence), the stop and everything
    after it dropped. `stopped` says whether one was met."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped or not self._stops:
            return "" if self.stopped else text
        self._pending += text
        found = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if found:
            self.stopped = True
            out, self._pending = self._pending[: min(found)], ""
            return out
        cut = max(0, len(self._pending) - self._hold)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def finish(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


def _add(a: Usage | None, b: Usage) -> Usage:
    if a is None:
        return b
    return Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens)


def user_digest(user: str | None) -> str | None:
    """The `user` field is an end-user id the client chose: audited as a digest, never as given."""
    return None if user is None else "sha256:" + hashlib.sha256(user.encode()).hexdigest()[:32]


def _granted_chat_models(
    policy: Policy, models: Mapping[str, ChatModel], ctx: RequestContext
) -> list[ChatModel]:
    principal = ctx.principal
    assert principal is not None
    return [
        m
        for name, m in models.items()
        if policy.grant(principal.roles, name).narrowed(principal.scope, name).allows(Action.CHAT)
    ]


def _model_entry(model: ChatModel, created: int) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": created, "owned_by": "bastion"}


class ListChatModels:
    """`GET /v1/models`: only the models this caller may chat with (deny by default: the others are
    not named)."""

    def __init__(self, policy: Policy, models: Mapping[str, ChatModel], started: int) -> None:
        self._policy = policy
        self._models = models
        self._started = started

    async def __call__(self, ctx: RequestContext) -> None:
        granted = _granted_chat_models(self._policy, self._models, ctx)
        ctx.result = {"object": "list", "data": [_model_entry(m, self._started) for m in granted]}


class DescribeChatModel:
    """`GET /v1/models/{id}`: 404 for a model not served, 403 for one not granted."""

    def __init__(self, policy: Policy, models: Mapping[str, ChatModel], started: int) -> None:
        self._policy = policy
        self._models = models
        self._started = started

    async def __call__(self, ctx: RequestContext) -> None:
        assert ctx.model_name is not None
        model = self._models.get(ctx.model_name)
        if model is None:
            raise NotFound(f"model {ctx.model_name!r} is not served", code=ErrorCode.MODEL_NOT_FOUND)
        if model not in _granted_chat_models(self._policy, {model.name: model}, ctx):
            raise PermissionDenied(f"not permitted to chat with model {model.name!r}")
        ctx.result = _model_entry(model, self._started)
