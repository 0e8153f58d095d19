"""What one request carries through the pipeline. Transport-neutral: no HTTP here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bastion.config import Action, OutputDetail
from bastion.policy import EffectiveGrant, TokenScope
from bastion.registry import ServedModel


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    roles: tuple[str, ...]
    scope: TokenScope | None = None  # set when the caller used a token: it narrows the key's grants
    via: str = "key"  # "key" | "token"
    quarantined: bool = False  # query auditing suspected extraction; the containment gate refuses it

    @property
    def id(self) -> str:
        return f"key:{self.key_id}"


@dataclass(slots=True)
class InferRequest:
    """A decoded Open Inference Protocol V2 request: tensors by name, ready for the runtime."""

    id: str | None
    inputs: dict[str, np.ndarray]
    requested_outputs: list[str] | None
    parameters: dict[str, Any]
    rows: int


@dataclass(slots=True)
class RequestContext:
    request_id: str
    action: Action
    now: float  # wall-clock seconds, read once per request
    credentials: str | None  # the Authorization header value; never logged
    read_body: Callable[[int], Awaitable[bytes]]
    # The transport's decoder for an inference body (V2 JSON when None): REST's binary tensor
    # extension and gRPC bring their own, and every stage after decoding sees the same InferRequest.
    decode: Callable[[bytes], InferRequest] | None = None
    client: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    principal: Principal | None = None
    model: ServedModel | None = None
    grant: EffectiveGrant | None = None
    body: bytes | None = None
    request: InferRequest | None = None
    prediction: np.ndarray | None = None  # (rows, classes) probabilities, or (rows, 1) values
    output_detail: OutputDetail | None = None
    result: dict[str, Any] | None = None  # the JSON response body when the pipeline succeeds
    result_text: bytes | None = None  # a plain-text response body (metrics)
    payload_hmac: str | None = None
    # The rows in the reference data's whitened space and their squared distances to its centre:
    # measured once by the input guard's out-of-distribution screen, reused by query auditing.
    measured: tuple[np.ndarray, list[float]] | None = None
    # True when the rollout chose the version (an unversioned request): only such traffic is evidence
    # about a canary. A request naming its version chose it itself, and could steer a rollback.
    routed: bool = False
    # The runtime's own time for this batch in seconds (None: the runtime never ran), and whether it
    # raised: the server's failure, as opposed to a refusal of the client's input.
    inference_seconds: float | None = None
    runtime_failed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
