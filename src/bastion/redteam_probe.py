"""Extraction, evasion probing and membership inference against a served classifier, each measured
as a curve over the queries spent and stopped where containment strikes (403 `key_quarantined`).

The attacker holds a few public rows (`AttackData`): seeds to start from and held-out rows to
measure itself on. Queries are counted in rows sent to `/infer`, answered or refused.

- **Extraction** (Tramèr et al., "Stealing Machine Learning Models via Prediction APIs", USENIX
  Security 2016; the augmentation around seeds after Papernot et al., "Practical Black-Box Attacks
  against Machine Learning", AsiaCCS 2017): the seeds are queried, then Gaussian perturbations of
  the rows asked so far, a request at a time; a scikit-learn thief (decision tree or logistic
  regression) is refitted on every answer and its **fidelity** measured: the share of held-out rows
  on which it agrees with the victim.
- **Evasion probing**: IBM ART's HopSkipJump (Chen, Jordan and Wainwright, "HopSkipJumpAttack: A
  Query-Efficient Decision-Based Attack", IEEE S&P 2020), label-only, one iteration at a time from
  a real row of another class, walking a stream of near-duplicate rows along the decision boundary
  toward the start row. Success: an adversarial row within `epsilon` of the start (root mean square
  over the features, in standard deviations of the attacker's rows).
- **Membership inference**: `bastion.redteam.membership_inference` on growing prefixes of the known
  members and non-members, one attack AUC per prefix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from bastion.errors import BastionException
from bastion.redteam import Contained, RemoteError, membership_inference, redact_url

Progress = Callable[[int], object]  # told how many more rows were sent


class Victim(Protocol):
    """What the attacks need of a served classifier: `RemoteModel` over HTTP, or any other."""

    classes: list[str]
    rows_sent: int  # rows asked about so far, answered or refused

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Scores or one-hot labels (n, classes) for rows `x` (n, d). Raises RemoteError."""
        ...


def _no_progress(_rows: int) -> None:
    return None


@dataclass(frozen=True)
class AttackData:
    """The attacker's rows: `seeds` (n, d) to start from, `holdout` (m, d) to measure fidelity on,
    never queried by the extraction itself."""

    seeds: np.ndarray
    holdout: np.ndarray

    @classmethod
    def split(cls, x: np.ndarray, *, seeds: int, holdout: int, seed: int = 0) -> AttackData:
        """A random `seeds` rows and `holdout` others of `x` (n, d). Raises ValueError if x is too small."""
        if seeds < 2 or holdout < 1 or len(x) < seeds + holdout:
            raise ValueError(f"need at least {seeds} + {holdout} rows (and 2 seeds); got {len(x)}")
        order = np.random.default_rng(seed).permutation(len(x))
        x = np.asarray(x, dtype=np.float64)
        return cls(seeds=x[order[:seeds]], holdout=x[order[seeds : seeds + holdout]])


@dataclass(frozen=True)
class ExtractionResult:
    thief: str
    budget: int  # rows the attack was allowed to send
    queries: int  # rows sent (the refused request that contained it included)
    answered: int  # rows the thief trained on
    refused: int  # rows refused for another reason (e.g. out of distribution)
    fidelity: float | None  # the last thief's agreement with the victim on held-out rows (0..1); None: no answer
    contained_at: int | None  # rows sent when the server answered 403 key_quarantined; None: never
    points: list[tuple[int, float]]  # (rows sent, fidelity) after each answered request


@dataclass(frozen=True)
class EvasionSample:
    queries: int  # rows sent for this start row
    distance: float  # RMS distance, in standard deviations, of the closest adversarial row found
    success: bool  # distance <= epsilon
    points: list[tuple[int, float]]  # (rows sent in the whole probe, distance) after each iteration


@dataclass(frozen=True)
class EvasionResult:
    budget: int
    epsilon: float
    queries: int
    refused: int
    success_rate: float  # successes over the start rows attempted (0 when none was)
    queries_to_success: int | None  # rows sent when the first start row succeeded
    contained_at: int | None
    samples: list[EvasionSample] = field(default_factory=list)


@dataclass(frozen=True)
class MembershipCurve:
    queries: int
    auc: float | None  # the last AUC measured; None: too few answers to fit the attack
    contained_at: int | None
    points: list[tuple[int, float]]  # (rows sent, attack AUC)
    final: dict[str, float] | None  # every figure of the last MembershipResult


@dataclass(frozen=True)
class RunGate:
    """Thresholds of a deployment gate; None leaves a figure unchecked."""

    max_fidelity: float | None = None
    max_auc: float | None = None
    max_evasion_success: float | None = None
    require_containment: bool = False  # extraction and evasion must both end in 403 key_quarantined

    def failures(self, report: RedTeamReport) -> list[str]:
        failed = []
        ex, ev, mi = report.extraction, report.evasion, report.membership
        if self.max_fidelity is not None and ex is not None and (ex.fidelity or 0.0) > self.max_fidelity:
            failed.append(f"extraction fidelity {ex.fidelity:.3f} > {self.max_fidelity:g}")
        if self.max_auc is not None and mi is not None and mi.auc is not None and mi.auc > self.max_auc:
            failed.append(f"membership auc {mi.auc:.3f} > {self.max_auc:g}")
        if (
            self.max_evasion_success is not None
            and ev is not None
            and ev.success_rate > self.max_evasion_success
        ):
            failed.append(f"evasion success {ev.success_rate:.3f} > {self.max_evasion_success:g}")
        if self.require_containment:
            for name, result in (("extraction", ex), ("evasion", ev)):
                if result is not None and result.contained_at is None:
                    failed.append(f"{name} was never contained")
        return failed


@dataclass(frozen=True)
class RedTeamReport:
    model: str
    url: str  # as redact_url prints it
    started: float  # Unix time
    seconds: float
    classes: list[str]
    extraction: ExtractionResult | None
    evasion: EvasionResult | None
    membership: MembershipCurve | None
    failures: list[str]
    passed: bool
    thresholds: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fidelity(thief: Any, classes_seen: np.ndarray, holdout: np.ndarray, truth: np.ndarray) -> float:
    guess = thief.predict(holdout) if thief is not None else np.full(len(truth), classes_seen[0])
    return float((guess == truth).mean())


def _thief(kind: str, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    if kind == "tree":
        return DecisionTreeClassifier(random_state=seed)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


@dataclass(frozen=True)
class Labelled:
    """The attacker's rows with the victim's labels (class indices), asked once before the attacks."""

    data: AttackData
    seed_labels: np.ndarray  # (n,)
    holdout_labels: np.ndarray  # (m,)
    refused: int  # candidate rows the server refused (422), left out


def label_rows(remote: Victim, x: np.ndarray, *, seeds: int, holdout: int, seed: int = 0) -> Labelled:
    """Ask the victim about the attacker's rows `x` (n, d), drop those it refuses (422), and split
    the rest into `seeds` and `holdout` rows (`AttackData.split`). Raises RemoteError (Contained when
    the key is quarantined), ValueError when too few rows are answered."""
    out, ok = _ask(remote, np.asarray(x, dtype=np.float64))
    kept = np.asarray(x, dtype=np.float64)[ok]
    labels = out.argmax(axis=1)
    data = AttackData.split(kept, seeds=seeds, holdout=holdout, seed=seed)
    index = {row.tobytes(): int(label) for row, label in zip(kept, labels, strict=True)}
    return Labelled(
        data=data,
        seed_labels=np.asarray([index[r.tobytes()] for r in data.seeds], dtype=np.int64),
        holdout_labels=np.asarray([index[r.tobytes()] for r in data.holdout], dtype=np.int64),
        refused=int((~ok).sum()),
    )


def extraction_attack(
    remote: Victim,
    data: AttackData,
    holdout_labels: np.ndarray,
    *,
    budget: int,
    batch: int = 16,
    thief: Literal["tree", "logistic"] = "tree",
    noise: float = 0.05,
    seed: int = 0,
    progress: Progress = _no_progress,
) -> ExtractionResult:
    """Steal `remote` with at most `budget` rows, `batch` rows a request: the seeds first, then
    synthetic rows between two rows asked so far (a uniform point on the segment, plus Gaussian
    noise of `noise` standard deviations of the attacker's rows per feature: a point on the segment
    keeps the features' correlations, so the row stays near the data). `holdout_labels` (m,): the
    victim's labels of `data.holdout`, asked beforehand (with another key: fidelity is the
    attacker's yardstick, not part of the attack). Stops at the budget or at the first 403
    key_quarantined. A request refused with 422 is asked again row by row and the refused rows
    dropped. Raises RemoteError for any other failure."""
    rng = np.random.default_rng(seed)
    pool = np.vstack([data.seeds, data.holdout])
    scale = pool.std(axis=0) + 1e-12
    low, high = pool.min(axis=0), pool.max(axis=0)
    asked: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    points: list[tuple[int, float]] = []
    refused = 0
    contained_at = None
    start = remote.rows_sent
    queue = np.asarray(data.seeds, dtype=np.float64)
    fidelity: float | None = None
    while remote.rows_sent - start < budget:
        n = min(batch, budget - (remote.rows_sent - start))
        if len(queue):
            rows, queue = queue[:n], queue[n:]
        else:
            known = np.vstack(asked) if asked else data.seeds
            a = known[rng.integers(0, len(known), size=n)]
            b = known[rng.integers(0, len(known), size=n)]
            u = rng.uniform(size=(n, 1))
            rows = np.clip(a + u * (b - a) + rng.normal(size=a.shape) * scale * noise, low, high)
        before = remote.rows_sent
        try:
            out, ok = _ask(remote, rows)
        except Contained:
            contained_at = remote.rows_sent - start
            break
        finally:
            progress(remote.rows_sent - before)
        refused += int((~ok).sum())
        if not ok.any():
            continue
        asked.append(rows[ok])
        labels.append(out.argmax(axis=1))
        y = np.concatenate(labels)
        seen = np.unique(y)
        model = _thief(thief, seed).fit(np.vstack(asked), y) if len(seen) > 1 else None
        fidelity = _fidelity(model, seen, data.holdout, holdout_labels)
        points.append((remote.rows_sent - start, fidelity))
    return ExtractionResult(
        thief=thief,
        budget=budget,
        queries=remote.rows_sent - start,
        answered=sum(len(a) for a in asked),
        refused=refused,
        fidelity=fidelity,
        contained_at=contained_at,
        points=points,
    )


class _Spent(BastionException):
    """The probe's budget is used up (inside ART's loop, so raised through it)."""


def evasion_probe(
    remote: Victim,
    data: AttackData,
    holdout_labels: np.ndarray,
    seed_labels: np.ndarray,
    *,
    budget: int,
    epsilon: float = 0.25,
    starts: int = 3,
    batch: int = 64,
    seed: int = 0,
    progress: Progress = _no_progress,
) -> EvasionResult:
    """HopSkipJump (IBM ART, L2, untargeted) from up to `starts` held-out rows, each from the
    nearest seed the victim labels differently, with at most `budget` rows in all. The attack runs
    in the space of the attacker's standardised rows; `holdout_labels` (m,) and `seed_labels` (n,)
    are the victim's labels, asked beforehand. A request refused with 422 (e.g. out of
    distribution) is taken as "not adversarial": the attacker learns nothing from it.
    Raises RemoteError for failures other than 422 and 403 key_quarantined."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    pool = np.vstack([data.seeds, data.holdout])
    mean, scale = pool.mean(axis=0), pool.std(axis=0) + 1e-12
    z_seeds = (data.seeds - mean) / scale
    z_pool = (pool - mean) / scale
    clip = (float(z_pool.min()), float(z_pool.max()))
    nb = len(remote.classes)
    d = pool.shape[1]
    begin = remote.rows_sent
    refused = 0
    contained_at: int | None = None
    samples: list[EvasionSample] = []
    first_success: int | None = None
    current = [0]  # the start row's label, read by the predict function

    def predict(z: np.ndarray) -> np.ndarray:
        nonlocal refused
        out = np.zeros((len(z), nb))
        for i in range(0, len(z), batch):
            rows = z[i : i + batch]
            if remote.rows_sent - begin + len(rows) > budget:
                raise _Spent
            before = remote.rows_sent
            try:
                out[i : i + batch] = remote.predict(rows * scale + mean)
            except RemoteError as e:
                if isinstance(e, Contained) or e.status != 422:
                    raise
                refused += len(rows)
                out[i : i + batch, current[0]] = 1.0
            finally:
                progress(remote.rows_sent - before)
        return out

    classifier = BlackBoxClassifier(predict, input_shape=(d,), nb_classes=nb, clip_values=clip)
    order = np.random.default_rng(seed).permutation(len(data.holdout))
    for index in order[:starts]:
        label = int(holdout_labels[index])
        other = np.flatnonzero(seed_labels != label)
        if len(other) == 0:
            continue
        current[0] = label
        z0 = ((data.holdout[index] - mean) / scale)[None, :]
        nearest = other[np.argmin(((z_seeds[other] - z0) ** 2).sum(axis=1))]
        adversarial = z_seeds[nearest][None, :].copy()
        attack = HopSkipJump(
            classifier, batch_size=batch, max_iter=1, max_eval=200, init_eval=20, init_size=20, verbose=False
        )
        sent_before = remote.rows_sent
        distance = float(np.sqrt(((adversarial - z0) ** 2).mean()))
        points = [(remote.rows_sent - begin, distance)]
        stop = False
        try:
            for _ in range(50):
                adversarial = attack.generate(
                    x=z0.astype(np.float32), y=np.eye(nb)[[label]], x_adv_init=adversarial, resume=True
                )
                distance = float(np.sqrt(((adversarial - z0) ** 2).mean()))
                points.append((remote.rows_sent - begin, distance))
                if distance <= epsilon:
                    break
        except Contained:
            contained_at = remote.rows_sent - begin
            stop = True
        except _Spent:
            stop = True
        success = distance <= epsilon
        if success and first_success is None:
            first_success = remote.rows_sent - begin
        samples.append(EvasionSample(remote.rows_sent - sent_before, distance, success, points))
        if stop:
            break
    successes = sum(s.success for s in samples)
    return EvasionResult(
        budget=budget,
        epsilon=epsilon,
        queries=remote.rows_sent - begin,
        refused=refused,
        success_rate=successes / len(samples) if samples else 0.0,
        queries_to_success=first_success,
        contained_at=contained_at,
        samples=samples,
    )


def _ask(remote: Victim, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The answers to `rows` (n, d) and a mask of the rows answered: a request refused with 422 is
    asked again row by row, so one refused row costs only itself. Raises RemoteError otherwise."""
    try:
        return remote.predict(rows), np.ones(len(rows), dtype=bool)
    except RemoteError as e:
        if isinstance(e, Contained) or e.status != 422 or len(rows) == 1:
            raise
    kept, answers = [], []
    for row in rows:
        try:
            answers.append(remote.predict(row[None, :])[0])
            kept.append(True)
        except RemoteError as e:
            if isinstance(e, Contained) or e.status != 422:
                raise
            kept.append(False)
    width = len(remote.classes)
    return np.asarray(answers).reshape(-1, width), np.asarray(kept, dtype=bool)


def membership_curve(
    remote: Victim,
    members: tuple[np.ndarray, np.ndarray],
    nonmembers: tuple[np.ndarray, np.ndarray],
    *,
    clip_values: tuple[float, float],
    batch: int = 64,
    first: int = 20,
    seed: int = 0,
    progress: Progress = _no_progress,
) -> MembershipCurve:
    """Ask about members and non-members (labels as class indices) in alternating requests of
    `batch` rows, and run the membership attack on what was answered once `first`, 2x`first`,
    4x`first`... rows a side are, and at the end. Rows refused with 422 (out of distribution) are
    left out. Stops at the first 403 key_quarantined. Raises RemoteError for any other failure."""
    rng = np.random.default_rng(seed)
    sides = []
    for x, y in (members, nonmembers):
        order = rng.permutation(len(x))
        sides.append((np.asarray(x, dtype=np.float64)[order], np.asarray(y)[order]))
    n = min(len(sides[0][0]), len(sides[1][0]))
    kept: list[tuple[list[np.ndarray], list[int]]] = [([], []), ([], [])]
    answers: dict[bytes, np.ndarray] = {}
    begin = remote.rows_sent
    contained_at = None
    points: list[tuple[int, float]] = []
    final = None
    measured = 0
    checkpoint = first

    def cached(x: np.ndarray) -> np.ndarray:
        return np.stack([answers[np.asarray(row, dtype=np.float64).tobytes()] for row in x])

    def measure(k: int) -> None:
        nonlocal final, measured
        measured = k
        (mr, my), (nr, ny) = kept
        result = membership_inference(
            cached,
            members=(np.asarray(mr[:k]), np.asarray(my[:k])),
            nonmembers=(np.asarray(nr[:k]), np.asarray(ny[:k])),
            nb_classes=len(remote.classes),
            clip_values=clip_values,
            seed=seed,
        )
        final = asdict(result)
        points.append((remote.rows_sent - begin, result.auc))

    def answered() -> int:
        return min(len(kept[0][0]), len(kept[1][0]))

    for pos in range(0, n, batch):
        before = remote.rows_sent
        try:
            for (x, y), (rows_kept, labels_kept) in zip(sides, kept, strict=True):
                rows = x[pos : pos + batch]
                out, ok = _ask(remote, rows)
                for row, p in zip(rows[ok], out, strict=True):
                    answers[row.tobytes()] = p
                rows_kept.extend(rows[ok])
                labels_kept.extend(int(v) for v in y[pos : pos + batch][ok])
        except Contained:
            contained_at = remote.rows_sent - begin
            progress(remote.rows_sent - before)
            break
        progress(remote.rows_sent - before)
        if answered() >= checkpoint:
            measure(answered())
            while checkpoint <= answered():
                checkpoint *= 2
    if answered() > measured and answered() >= min(first, n):  # the last rows, or contained early
        measure(answered())
    return MembershipCurve(
        queries=remote.rows_sent - begin,
        auc=points[-1][1] if points else None,
        contained_at=contained_at,
        points=points,
        final=final,
    )


def report(
    *,
    model: str,
    url: str,
    started: float,
    classes: list[str],
    extraction: ExtractionResult | None,
    evasion: EvasionResult | None,
    membership: MembershipCurve | None,
    gate: RunGate,
) -> RedTeamReport:
    """The run's report, the gate applied."""
    draft = RedTeamReport(
        model=model,
        url=redact_url(url),
        started=started,
        seconds=round(time.time() - started, 3),
        classes=classes,
        extraction=extraction,
        evasion=evasion,
        membership=membership,
        failures=[],
        passed=True,
        thresholds=asdict(gate),
    )
    failures = gate.failures(draft)
    return RedTeamReport(**{**draft.__dict__, "failures": failures, "passed": not failures})


class Bar(Protocol):
    """A progress bar as tqdm's: told rows sent, closed at the end of a phase."""

    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


class _NoBar:
    def update(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


def no_bars(_phase: str, _total: int) -> Bar:
    return _NoBar()


@dataclass(frozen=True)
class RunPlan:
    """One red-team run against `model` at `url`. `key` answers the membership attack and labels the
    attacker's rows (genuine traffic); `extraction_key` and `evasion_key` carry the two attacks (the
    same key for all is allowed: a quarantined key then ends every later attack at its first row).
    `attacker_rows` (n, d): public rows the attacker holds, split into `seeds` and `holdout`."""

    url: str
    model: str
    key: str
    extraction_key: str
    evasion_key: str
    attacker_rows: np.ndarray
    members: tuple[np.ndarray, np.ndarray] | None = None  # rows (n, d), labels (names or indices)
    nonmembers: tuple[np.ndarray, np.ndarray] | None = None
    seeds: int = 10
    holdout: int = 150
    extraction_queries: int = 400
    evasion_queries: int = 400
    batch: int = 16
    thief: Literal["tree", "logistic"] = "tree"
    epsilon: float = 0.25
    starts: int = 3
    seed: int = 0
    gate: RunGate = field(default_factory=RunGate)


def run_redteam(plan: RunPlan, bars: Callable[[str, int], Bar] = no_bars) -> RedTeamReport:
    """Membership inference (when members and non-members are given), then extraction, then
    evasion probing, over HTTP (`bastion.redteam.RemoteModel`). Raises RemoteError when the server
    cannot be reached or refuses the labelling key, ValueError when the attacker's rows are too few."""
    from bastion.redteam import RemoteModel

    started = time.time()

    def phase(name: str, total: int) -> tuple[Bar, Progress]:
        bar = bars(name, total)
        return bar, bar.update

    oracle = RemoteModel(plan.url, plan.model, plan.key, batch=64)
    # First the attacker's own rows (genuine traffic; labels needed by both attacks), then membership.
    labelled = label_rows(oracle, plan.attacker_rows, seeds=plan.seeds, holdout=plan.holdout, seed=plan.seed)
    membership = None
    if plan.members is not None and plan.nonmembers is not None:
        (mx, my), (nx, ny) = plan.members, plan.nonmembers
        every = np.concatenate([mx, nx]).astype(np.float64)
        bar, tick = phase("membership", 2 * min(len(mx), len(nx)))
        try:
            membership = membership_curve(
                oracle,
                (mx, oracle.labels(np.asarray(my))),
                (nx, oracle.labels(np.asarray(ny))),
                clip_values=(float(every.min()), float(every.max())),
                seed=plan.seed,
                progress=tick,
            )
        finally:
            bar.close()
    bar, tick = phase("extraction", plan.extraction_queries)
    try:
        extraction = extraction_attack(
            RemoteModel(plan.url, plan.model, plan.extraction_key, batch=plan.batch),
            labelled.data,
            labelled.holdout_labels,
            budget=plan.extraction_queries,
            batch=plan.batch,
            thief=plan.thief,
            seed=plan.seed,
            progress=tick,
        )
    finally:
        bar.close()
    evasion = None
    try:
        evader = RemoteModel(plan.url, plan.model, plan.evasion_key, batch=plan.batch)
    except Contained:  # the metadata request refused: the key was quarantined before the probe began
        evasion = EvasionResult(plan.evasion_queries, plan.epsilon, 0, 0, 0.0, None, 0)
    if evasion is None:
        bar, tick = phase("evasion", plan.evasion_queries)
        try:
            evasion = evasion_probe(
                evader,
                labelled.data,
                labelled.holdout_labels,
                labelled.seed_labels,
                budget=plan.evasion_queries,
                epsilon=plan.epsilon,
                starts=plan.starts,
                batch=plan.batch,
                seed=plan.seed,
                progress=tick,
            )
        finally:
            bar.close()
    return report(
        model=plan.model,
        url=plan.url,
        started=started,
        classes=oracle.classes,
        extraction=extraction,
        evasion=evasion,
        membership=membership,
        gate=plan.gate,
    )
