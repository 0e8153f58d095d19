"""The error registry: every code has a status, every raise site uses a registered code of its kind's
status, and every exception Bastion defines has the one root."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import bastion
from bastion import errors
from bastion.errors import GRPC_STATUS, HTTP_STATUS, BastionError, BastionException, ErrorCode, grpc_status

SRC = Path(bastion.__file__).parent
# grpc.StatusCode names (spelled here so the test needs no grpc import)
_GRPC_NAMES = {
    "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS PERMISSION_DENIED "
    "RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE UNIMPLEMENTED INTERNAL UNAVAILABLE "
    "DATA_LOSS UNAUTHENTICATED"
}
GRPC_NAMES = set(next(iter(_GRPC_NAMES)).split())


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(SRC)], "bastion."))


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_code_has_one_http_and_one_grpc_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)
    for code in ErrorCode:
        assert 400 <= HTTP_STATUS[code] <= 599, code
        assert grpc_status(code) in GRPC_NAMES, code
    assert set(GRPC_STATUS) == set(HTTP_STATUS.values())
    assert grpc_status(ErrorCode.UNAUTHENTICATED) == "UNAUTHENTICATED"
    assert grpc_status(ErrorCode.KEY_QUARANTINED) == "PERMISSION_DENIED"
    assert grpc_status(ErrorCode.PRIVACY_BUDGET_EXHAUSTED) == "RESOURCE_EXHAUSTED"


def test_codes_are_stable_slugs() -> None:
    for code in ErrorCode:
        assert code.value == code.name.lower() and re.fullmatch(r"[a-z][a-z_]*", code.value)


def test_no_free_string_code_at_any_raise_site() -> None:
    # A code spelled as a string bypasses the registry (and its status table).
    found = [
        f"{path.relative_to(SRC)}:{n}"
        for path in _sources()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bcode\s*=\s*[\"']", line)
    ]
    assert found == []


def _error_classes() -> dict[str, type[BastionError]]:
    for name in _modules():
        importlib.import_module(name)
    seen: dict[str, type[BastionError]] = {}
    todo: list[type[BastionError]] = [BastionError]
    while todo:
        cls = todo.pop()
        seen[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return seen


def test_every_raise_site_names_a_code_of_its_kinds_status() -> None:
    """`SchemaViolation(..., code=ErrorCode.TOO_MANY_ROWS)` would answer 413 from a 422 kind: refused."""
    classes = _error_classes()
    checked = 0
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            cls = classes.get(node.func.id)
            if cls is None:
                continue
            for kw in node.keywords:
                if kw.arg != "code":
                    continue
                value = kw.value
                if isinstance(value, ast.Constant) and value.value is None:
                    continue
                if isinstance(value, ast.Name) and value.id == "code":  # a constructor passing its own on
                    continue
                where = f"{path.relative_to(SRC)}:{node.lineno}"
                assert (
                    isinstance(value, ast.Attribute)
                    and isinstance(value.value, ast.Name)
                    and value.value.id == "ErrorCode"
                ), where
                code = ErrorCode[value.attr]
                assert HTTP_STATUS[code] == HTTP_STATUS[cls.code], f"{where}: {code} on {cls.__name__}"
                checked += 1
    assert checked > 40  # the walk found the raise sites


def test_every_error_class_has_a_registered_default_code() -> None:
    for name, cls in _error_classes().items():
        assert isinstance(cls.code, ErrorCode), name


def test_every_exception_bastion_defines_has_the_one_root() -> None:
    for name in _modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == name:
                assert issubclass(obj, BastionException), f"{name}.{attr}"
    # Operator errors are not refusals: `except BastionError` in the core does not swallow them.
    for operator_error in (errors.ConfigError, errors.ModelLoadError, errors.StateDirLocked):
        assert not issubclass(operator_error, BastionError)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.BadRequest("x"), 400, "bad_request"),
        (errors.SchemaViolation("x", code=ErrorCode.WRONG_SHAPE), 422, "wrong_shape"),
        (errors.PayloadTooLarge("x", code=ErrorCode.TOO_MANY_ROWS), 413, "too_many_rows"),
        (errors.RateLimited("x", retry_after=1, code=ErrorCode.QUOTA_EXHAUSTED), 429, "quota_exhausted"),
        (errors.AuthThrottled(retry_after=1), 429, "auth_throttled"),
        (errors.AuthenticationFailed("key_revoked"), 401, "unauthenticated"),
        (errors.ModelFailed("x"), 500, "inference_failed"),
        (errors.MethodNotAllowed("x", allowed="GET"), 405, "method_not_allowed"),
    ],
)
def test_an_error_carries_its_status_and_code(error: BastionError, status: int, code: str) -> None:
    assert (error.status, error.code) == (status, code)
