"""The core in process: `Bastion.handle` with a RequestContext built here, no socket, no subprocess.

Like MLServer's dataplane tests: the transport's part of the context is what a test supplies; every
decision (identity, grants, guard, output policy, audit) is the real pipeline's.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.config import load_config
from bastion.context import RequestContext
from bastion.demo import DemoBuild, build_demo, infer_request
from bastion.routes import ROUTE_ACTIONS, Route
from bastion.service import Bastion, Outcome
from tests.helpers import core_context

Run = Callable[..., Awaitable[Outcome]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoBuild:
    return build_demo(tmp_path_factory.mktemp("core") / "demo", llm=False)


@pytest.fixture
def service(demo: DemoBuild) -> Iterator[Bastion]:
    config = demo.config_path
    s = Bastion(load_config(config), config_path=config)
    yield s
    s.close()  # a test that failed before its own shutdown still frees the state directory


def _context(
    route: Route, *, credentials: str | None, body: bytes = b"", model: str | None = None
) -> RequestContext:
    return core_context(route, credentials, body, model_name=model)


def _key(service: Bastion, role: str) -> str:
    return f"Bearer {service.keys.create(name=f'core-{role}', roles=[role], now=time.time()).secret}"


def _run(service: Bastion, calls: Callable[[Bastion], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        await service.startup()
        try:
            return await calls(service)
        finally:
            await service.aclose()

    return asyncio.run(go())


def _rows(demo: DemoBuild, n: int = 2) -> bytes:
    return json.dumps(infer_request(demo.features[:n])).encode()


def test_no_credentials_is_401_with_www_authenticate(service: Bastion, demo: DemoBuild) -> None:
    async def calls(s: Bastion) -> Outcome:
        return await s.handle(Route.INFER, _context(Route.INFER, credentials=None, model="breast-cancer"))

    outcome = _run(service, calls)
    assert outcome.status == 401
    assert outcome.body == {"error": "missing or invalid credentials", "code": "unauthenticated"}
    assert outcome.headers["WWW-Authenticate"] == 'Bearer realm="bastion"'


def test_a_forged_key_is_401_like_a_missing_one(service: Bastion) -> None:
    async def calls(s: Bastion) -> Outcome:
        ctx = _context(Route.INFER, credentials="Bearer bst_0123456789abcdef_forged", model="breast-cancer")
        return await s.handle(Route.INFER, ctx)

    outcome = _run(service, calls)
    assert (outcome.status, outcome.body) == (
        401,
        {"error": "missing or invalid credentials", "code": "unauthenticated"},
    )


def test_an_ungranted_action_is_403(service: Bastion, demo: DemoBuild) -> None:
    # The analyst may infer on breast-cancer, not aggregate over it, and is no admin.
    async def calls(s: Bastion) -> list[Outcome]:
        key = _key(s, "analyst")
        aggregate = _context(Route.AGGREGATE, credentials=key, body=_rows(demo), model="breast-cancer")
        return [
            await s.handle(Route.AGGREGATE, aggregate),
            await s.handle(Route.METRICS, _context(Route.METRICS, credentials=key)),
        ]

    for outcome in _run(service, calls):
        assert outcome.status == 403
        assert outcome.body["code"] == "forbidden"


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda doc: doc["inputs"][0].update(shape=[2, 3], data=[0.0] * 6), "wrong_shape"),
        (lambda doc: doc["inputs"][0]["data"].__setitem__(0, 1e30), "out_of_range"),
        (lambda doc: doc["inputs"][0].update(name="other"), "unknown_input"),
        (lambda doc: doc["inputs"][0].update(datatype="INT64"), "wrong_datatype"),
    ],
)
def test_the_guard_refuses_with_422_before_the_model(
    service: Bastion, demo: DemoBuild, mutate: Callable[[dict[str, Any]], None], code: str
) -> None:
    doc = infer_request(demo.features[:2])
    mutate(doc)

    async def calls(s: Bastion) -> tuple[Outcome, RequestContext]:
        ctx = _context(
            Route.INFER, credentials=_key(s, "analyst"), body=json.dumps(doc).encode(), model="breast-cancer"
        )
        return await s.handle(Route.INFER, ctx), ctx

    outcome, ctx = _run(service, calls)
    assert outcome.status == 422
    assert outcome.body["code"] == code
    assert ctx.prediction is None and ctx.inference_seconds is None  # nothing reached the model


def test_a_granted_inference_answers_labels_only(service: Bastion, demo: DemoBuild) -> None:
    async def calls(s: Bastion) -> tuple[Outcome, RequestContext]:
        ctx = _context(
            Route.INFER, credentials=_key(s, "analyst"), body=_rows(demo, 3), model="breast-cancer"
        )
        return await s.handle(Route.INFER, ctx), ctx

    outcome, ctx = _run(service, calls)
    assert outcome.status == 200, outcome.body
    assert isinstance(outcome.body, dict) and ctx.model is not None
    assert outcome.headers["x-model-version"] == ctx.model.version
    # The label policy: the names of the classes the model predicts, row by row, and no score.
    classes = ctx.model.manifest.outputs.classes
    assert classes is not None
    expected = [classes[int(i)] for i in demo.estimator.predict(demo.features[:3])]
    [output] = outcome.body["outputs"]
    assert output["datatype"] == "BYTES" and output["data"] == expected
    assert ctx.prediction is not None and ctx.prediction.shape == (3, 2)  # the runtime's scores stayed inside
    assert not any(isinstance(v, float) for v in output["data"])


def test_every_request_has_its_audit_record(service: Bastion, demo: DemoBuild) -> None:
    async def calls(s: Bastion) -> list[tuple[str, int]]:
        key = _key(s, "analyst")
        sent = [
            _context(Route.INFER, credentials=None, model="breast-cancer"),
            _context(Route.INFER, credentials=key, body=_rows(demo), model="breast-cancer"),
            _context(Route.METRICS, credentials=key),
            _context(Route.INFER, credentials=key, body=b"{not json", model="breast-cancer"),
        ]
        routes = [Route.INFER, Route.INFER, Route.METRICS, Route.INFER]
        return [
            (ctx.request_id, (await s.handle(r, ctx)).status) for r, ctx in zip(routes, sent, strict=True)
        ]

    sent = _run(service, calls)
    with sqlite3.connect(service.paths.audit) as db:
        records = [json.loads(body) for (body,) in db.execute("SELECT body FROM records ORDER BY seq")]
    by_id = {r["request_id"]: r for r in records if r.get("request_id")}
    assert [(rid, by_id[rid]["status"]) for rid, _ in sent] == sent
    assert [by_id[rid]["decision"] for rid, _ in sent] == ["deny", "allow", "deny", "deny"]
    assert [by_id[rid]["reason"] for rid, _ in sent][2:] == ["forbidden", "malformed_json"]
    allowed = by_id[sent[1][0]]
    assert (
        allowed["model"] == "breast-cancer"
        and allowed["payload_hmac"]
        and allowed["principal"].startswith("key:")
    )
    raw = Path(service.paths.audit).read_bytes()
    assert str(float(demo.features[0][0])).encode() not in raw  # the payload is keyed-hashed, not stored


def test_a_transport_cannot_set_a_pipeline_decision() -> None:
    async def read_body(limit: int) -> bytes:
        return b""

    with pytest.raises(TypeError):
        RequestContext(
            "r", ROUTE_ACTIONS[Route.AGGREGATE], 0.0, None, read_body, rows_from_signed_reference=True
        )  # type: ignore[call-arg]
    ctx = RequestContext("r", ROUTE_ACTIONS[Route.AGGREGATE], 0.0, None, read_body)
    assert ctx.rows_from_signed_reference is False and ctx.principal is None
