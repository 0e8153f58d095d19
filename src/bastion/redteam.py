"""Privacy red-team harness: attack a served model over its real API and measure what leaks.

`membership_inference` runs IBM ART's black-box membership inference attack (attack
model `rf`: no deep-learning framework needed) and the label-only gap attack
against any `predict` function, normally one that queries a running server with
the attacker's key. Half of the known members and non-members train the attack,
the other half measure it. The numbers can gate a deployment: see
`tests/e2e/test_privacy_attacks.py` and `bench/privacy.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bastion.errors import BastionException


@dataclass(frozen=True)
class MembershipResult:
    auc: float  # attack ROC AUC: 0.5 is a coin toss
    accuracy: float  # attack accuracy on balanced members / non-members at threshold 0.5
    tpr_at_1pct_fpr: float  # members found while wrongly accusing at most 1% of non-members
    gap_accuracy: float  # label-only gap attack: "correctly classified => member"
    benign_accuracy: float  # accuracy of the served answers on non-members


def membership_inference(
    predict: Callable[[np.ndarray], np.ndarray],
    *,
    members: tuple[np.ndarray, np.ndarray],
    nonmembers: tuple[np.ndarray, np.ndarray],
    nb_classes: int,
    clip_values: tuple[float, float],
    seed: int = 0,
) -> MembershipResult:
    from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
    from art.estimators.classification import BlackBoxClassifier
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(seed)
    (mx, my), (nx, ny) = members, nonmembers
    n = min(len(mx), len(nx))
    mi, ni = rng.permutation(len(mx))[:n], rng.permutation(len(nx))[:n]
    half = n // 2
    one_hot = np.eye(nb_classes)
    pm, pn = predict(mx[mi]), predict(nx[ni])  # one pass each: every answer the attacker sees

    classifier = BlackBoxClassifier(
        predict, input_shape=tuple(mx.shape[1:]), nb_classes=nb_classes, clip_values=clip_values
    )
    attack = MembershipInferenceBlackBox(classifier, input_type="prediction", attack_model_type="rf")
    attack.fit(
        x=mx[mi][:half],
        y=one_hot[my[mi][:half]],
        test_x=nx[ni][:half],
        test_y=one_hot[ny[ni][:half]],
        pred=pm[:half],
        test_pred=pn[:half],
    )
    s_m = np.ravel(attack.infer(mx[mi][half:], one_hot[my[mi][half:]], pred=pm[half:], probabilities=True))
    s_n = np.ravel(attack.infer(nx[ni][half:], one_hot[ny[ni][half:]], pred=pn[half:], probabilities=True))
    truth = np.r_[np.ones(len(s_m)), np.zeros(len(s_n))]
    scores = np.r_[s_m, s_n]
    fpr, tpr, _ = roc_curve(truth, scores)
    correct_m = pm[half:].argmax(axis=1) == my[mi][half:]
    correct_n = pn[half:].argmax(axis=1) == ny[ni][half:]
    return MembershipResult(
        auc=float(roc_auc_score(truth, scores)),
        accuracy=float(((scores >= 0.5) == truth).mean()),
        tpr_at_1pct_fpr=float(tpr[fpr <= 0.01].max(initial=0.0)),
        gap_accuracy=float((correct_m.sum() + (~correct_n).sum()) / (len(correct_m) + len(correct_n))),
        benign_accuracy=float((pn.argmax(axis=1) == ny[ni]).mean()),
    )


class RemoteError(BastionException):
    """The server refused or could not be reached; the message names the status and code.

    `status` is the HTTP status (0 when the server could not be reached) and `code` Bastion's
    stable error code from the answer's body ("" when it had none)."""

    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Contained(RemoteError):
    """The server answered 403 `key_quarantined`: containment struck and the key is refused from now on."""


def redact_url(url: str) -> str:
    """The URL as it may be printed: scheme, host, port and path only. A user:password@ part, a query
    string and a fragment can carry credentials, so they are dropped (and what follows "@" kept)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "<unparsable URL>"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else "<URL without a scheme>"


class RemoteModel:
    """A served classifier, queried over the Open Inference Protocol V2 as an attacker would:
    with one key, through the public API, seeing only what the key's output policy returns."""

    def __init__(
        self, base_url: str, model: str, key: str, *, batch: int = 256, timeout: float = 30.0
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise RemoteError(
                f"{redact_url(base_url)!r}: the server's URL must start with http:// or https://"
            )
        self._base = base_url.rstrip("/")
        self._model = model
        self._key = key
        self._batch = batch
        self._timeout = timeout
        meta = self._call("GET", f"/v2/models/{model}")
        classes = meta.get("parameters", {}).get("classes")
        inputs = meta.get("inputs", [])
        if not classes:
            raise RemoteError(f"model {model!r} is not a classifier (no classes in its metadata)")
        if len(inputs) != 1:
            raise RemoteError(f"model {model!r} has {len(inputs)} inputs; the harness sends one")
        self.classes: list[str] = [str(c) for c in classes]
        self._input = inputs[0]
        self.rows_sent = 0  # rows in every infer request sent, answered or refused
        self.requests_sent = 0

    def labels(self, y: np.ndarray) -> np.ndarray:
        """Class indices for `y`, given as indices or as class names."""
        if y.dtype.kind in "iu":
            return y.astype(np.int64)
        index = {name: i for i, name in enumerate(self.classes)}
        try:
            return np.asarray([index[str(v)] for v in y], dtype=np.int64)
        except KeyError as e:
            raise RemoteError(f"label {e.args[0]!r} is not a class of {self._model!r}") from None

    def predict(self, x: np.ndarray) -> np.ndarray:
        """What the attacker learns per row: the scores if the policy returns any, else a one-hot label."""
        out = []
        for start in range(0, len(x), self._batch):
            rows = x[start : start + self._batch]
            body = {
                "inputs": [
                    {
                        "name": self._input["name"],
                        "datatype": self._input["datatype"],
                        "shape": list(rows.shape),
                        "data": rows.ravel().tolist(),
                    }
                ]
            }
            self.rows_sent += len(rows)
            self.requests_sent += 1
            answer = self._call("POST", f"/v2/models/{self._model}/infer", body)
            outputs = {o["name"]: o for o in answer["outputs"]}
            if "probabilities" in outputs:
                out.append(
                    np.asarray(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
                )
            else:
                out.append(np.eye(len(self.classes))[self.labels(np.asarray(outputs["label"]["data"]))])
        return np.concatenate(out)

    def _call(self, method: str, path: str, body: object | None = None) -> dict:  # type: ignore[type-arg]
        """One request; a 429 `rate_limited` is waited out (Retry-After, at most 5 s a time, 30 times),
        as a patient attacker would: the rate limit slows an attack, it does not end it."""
        import time

        for _ in range(30):
            try:
                return self._call_once(method, path, body)
            except _Throttled as e:
                time.sleep(e.wait)
        return self._call_once(method, path, body)

    def _call_once(self, method: str, path: str, body: object | None) -> dict:  # type: ignore[type-arg]
        import http.client
        import json
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (the scheme is checked in __init__)
            self._base + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                answer: dict = json.loads(response.read())  # type: ignore[type-arg]
                return answer
        except urllib.error.HTTPError as e:
            server_code = ""  # the server's error code, when its answer says one
            try:
                detail = json.loads(e.read())
                server_code = str(detail.get("code") or "")
                reason = f"{detail.get('code')}: {detail.get('error')}"
            except (ValueError, AttributeError):
                reason = e.reason
            if e.code == 429 and server_code == "rate_limited":
                try:
                    wait = float(e.headers.get("Retry-After", "1"))
                except ValueError:
                    wait = 1.0
                raise _Throttled(min(max(wait, 0.05), 5.0)) from None
            kind = Contained if e.code == 403 and server_code == "key_quarantined" else RemoteError
            raise kind(f"{method} {path}: HTTP {e.code} ({reason})", status=e.code, code=server_code) from None
        except urllib.error.URLError as e:  # the reason (refused, timed out, unknown host) holds no URL
            raise RemoteError(f"{method} {path}: cannot reach {redact_url(self._base)}: {e.reason}") from None
        except (OSError, ValueError, http.client.HTTPException) as e:  # InvalidURL repeats the netloc
            raise RemoteError(
                f"{method} {path}: cannot reach {redact_url(self._base)}: {type(e).__name__}"
            ) from None


class _Throttled(BastionException):
    """429 `rate_limited`: wait `wait` seconds and send again (internal to `RemoteModel`)."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"rate limited: retry in {wait:.2f} s")
        self.wait = wait


@dataclass(frozen=True)
class Gate:
    """Thresholds a deployment must meet; None leaves a metric unchecked."""

    max_auc: float | None = None
    max_accuracy: float | None = None
    max_tpr_at_1pct_fpr: float | None = None
    max_gap_accuracy: float | None = None
    min_benign_accuracy: float | None = None

    def failures(self, result: MembershipResult) -> list[str]:
        checks = [
            ("auc", result.auc, self.max_auc, max),
            ("accuracy", result.accuracy, self.max_accuracy, max),
            ("tpr_at_1pct_fpr", result.tpr_at_1pct_fpr, self.max_tpr_at_1pct_fpr, max),
            ("gap_accuracy", result.gap_accuracy, self.max_gap_accuracy, max),
            ("benign_accuracy", result.benign_accuracy, self.min_benign_accuracy, min),
        ]
        failed = []
        for name, value, bound, kind in checks:
            if bound is None:
                continue
            if kind is max and value > bound:
                failed.append(f"{name} {value:.3f} > {bound:g}")
            elif kind is min and value < bound:
                failed.append(f"{name} {value:.3f} < {bound:g}")
        return failed
