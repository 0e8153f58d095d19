"""Output perturbation and privacy budgets: calibration, argmax preservation, exact accounting."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from bastion.privacy import (
    AnswerCache,
    OpenDPNoise,
    dp_scores,
    dp_values,
    gaussian_scale,
    laplace_scale,
    policy_tag,
    reverse_sigmoid,
)
from bastion.state import (
    BudgetKey,
    LeasedStateStore,
    MemoryStateStore,
    SQLiteLedger,
    SQLiteStateStore,
    StateStore,
)
from bastion.state.postgres import PostgresStateStore
from bastion.state.redis import RedisStateStore
from tests.helpers import (
    POSTGRES_DSN,
    REDIS_URL,
    drop_postgres_table,
    drop_redis_keys,
    postgres_table,
    redis_prefix,
)


class NoNoise:
    resolution = 0.0

    def __init__(self) -> None:
        self.scales: list[float] = []

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        self.scales.append(scale)
        return values

    def gaussian(self, values: np.ndarray, scale: float) -> np.ndarray:
        self.scales.append(scale)
        return values


def _random_probabilities(rows: int, classes: int, seed: int = 0) -> np.ndarray:
    p = np.random.default_rng(seed).dirichlet(np.full(classes, 0.3), size=rows)
    return np.asarray(p)


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_reverse_sigmoid_keeps_the_argmax_and_sums_to_one(classes: int) -> None:
    p = _random_probabilities(5000, classes)
    r = reverse_sigmoid(p, beta=0.8, gamma=2.0)
    assert (r.argmax(axis=1) == p.argmax(axis=1)).all()
    np.testing.assert_allclose(r.sum(axis=1), 1.0)
    assert np.abs(r - p).mean() > 0.01


def test_reverse_sigmoid_small_batches_match_the_vector_path() -> None:
    p = _random_probabilities(400, 3, seed=1)
    vector = reverse_sigmoid(p, beta=0.7, gamma=1.5)  # 1200 values: the numpy path
    for i in range(0, 400, 7):
        np.testing.assert_allclose(
            reverse_sigmoid(p[i : i + 2], beta=0.7, gamma=1.5), vector[i : i + 2], atol=1e-12
        )


def test_gaussian_cost_matches_opendp() -> None:
    import opendp.prelude as dp

    from bastion.stages.output_policy import rho_per_row

    dp.enable_features("contrib")
    for sigma in (0.5, 2.0, 4.0):
        m = (
            dp.vector_domain(dp.atom_domain(T=float, nan=False)),
            dp.l2_distance(T=float),
        ) >> dp.m.then_gaussian(scale=sigma)
        assert rho_per_row(sigma) == pytest.approx(m.map(math.sqrt(2)))  # one vote moved: L2 distance sqrt(2)


def test_dp_calibration_and_injected_noise() -> None:
    p = _random_probabilities(3, 4)
    fake = NoNoise()
    np.testing.assert_allclose(dp_scores(p, mechanism="laplace", epsilon=0.5, delta=1e-6, noise=fake), p)
    assert fake.scales == [laplace_scale(0.5)] == [4.0]  # L1 sensitivity 2 / epsilon
    dp_scores(p, mechanism="gaussian", epsilon=1.0, delta=1e-5, noise=fake)
    assert fake.scales[1] == pytest.approx(math.sqrt(2) * math.sqrt(2 * math.log(1.25 / 1e-5)))
    assert gaussian_scale(2.0, 1e-5) == pytest.approx(fake.scales[1] / 2)


def test_opendp_laplace_noise_has_the_calibrated_spread() -> None:
    noise = OpenDPNoise()
    zeros = np.zeros((4000, 1))
    samples = noise.laplace(zeros, 2.0).ravel()
    assert abs(samples.mean()) < 0.2
    assert np.std(samples) == pytest.approx(2.0 * math.sqrt(2), rel=0.1)  # Laplace(b) has std b*sqrt(2)
    assert len(set(samples.tolist())) > 3900  # fresh randomness each call


@pytest.mark.parametrize("backend", ["memory", "sqlite", "redis", "postgres"])
def test_budget_spends_exactly_and_renews_per_window(tmp_path: Path, backend: str) -> None:
    prefix = redis_prefix() if backend == "redis" else ""
    table = postgres_table() if backend == "postgres" else ""

    async def run() -> None:
        store: StateStore = {
            "memory": MemoryStateStore,
            "sqlite": lambda: SQLiteStateStore(tmp_path / "s.db"),
            "redis": lambda: RedisStateStore(REDIS_URL, prefix=prefix),
            "postgres": lambda: PostgresStateStore(POSTGRES_DSN, table=table),
        }[backend]()
        got = [
            (await store.spend_budget(BudgetKey("p", "m/epsilon", 1000), cost=0.3, limit=1.0, now=100.0))
            for _ in range(4)
        ]
        assert [g.allowed for g in got] == [True, True, True, False]
        assert got[2].remaining == pytest.approx(0.1) and got[3].retry_after == pytest.approx(900.0)
        assert (
            await store.spend_budget(BudgetKey("p", "m/epsilon", 1000), cost=0.1, limit=1.0, now=200.0)
        ).allowed
        assert (
            await store.spend_budget(BudgetKey("p", "m/epsilon", 1000), cost=0.3, limit=1.0, now=1000.0)
        ).allowed
        assert (
            await store.spend_budget(BudgetKey("q", "m/epsilon", 1000), cost=1.0, limit=1.0, now=100.0)
        ).allowed
        await store.aclose()

    asyncio.run(run())
    if prefix:
        drop_redis_keys(prefix)
    if table:
        drop_postgres_table(table)


def _spender(path: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def run() -> int:
        store = SQLiteStateStore(Path(path))
        ok = 0
        for _ in range(30):
            ok += (
                await store.spend_budget(BudgetKey("shared", "m/epsilon", 100), cost=0.5, limit=20.0, now=5.0)
            ).allowed
        store.close()
        return ok

    queue.put(asyncio.run(run()))


@pytest.mark.slow
def test_sqlite_budget_is_never_exceeded_across_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_spender, args=(str(tmp_path / "s.db"), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    granted = sum(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert granted <= 40  # 20.0 / 0.5: never more, whatever the interleaving of leases

    async def rest() -> int:
        store = SQLiteStateStore(tmp_path / "s.db")
        spends = [
            await store.spend_budget(BudgetKey("shared", "m/epsilon", 100), cost=0.5, limit=20.0, now=6.0)
            for _ in range(50)
        ]
        store.close()
        return sum(s.allowed for s in spends)

    # Every worker closed cleanly and gave back what it held: what is left is exactly the rest.
    assert granted + asyncio.run(rest()) == 40


def test_one_process_spends_a_large_budget_exactly_through_leases(tmp_path: Path) -> None:
    """Leases of up to 64 answers: the last answers still come out exactly, and the file agrees."""

    async def run() -> list[bool]:
        store = SQLiteStateStore(tmp_path / "s.db")
        got = [
            (
                await store.spend_budget(BudgetKey("p", "m/epsilon", 100), cost=0.25, limit=100.0, now=1.0)
            ).allowed
            for _ in range(420)
        ]
        store.close()
        return got

    assert asyncio.run(run()) == [True] * 400 + [False] * 20
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("SELECT spent FROM privacy_budget").fetchone()[0] == pytest.approx(100.0)


def test_a_crash_forfeits_the_held_block_and_never_over_spends(tmp_path: Path) -> None:
    async def spend(n: int, *, close: bool) -> int:
        store = SQLiteStateStore(tmp_path / "s.db")
        ok = sum(
            [
                (
                    await store.spend_budget(
                        BudgetKey("p", "m/epsilon", 100), cost=1.0, limit=1000.0, now=1.0
                    )
                ).allowed
                for _ in range(n)
            ]
        )
        if close:
            store.close()
        return ok

    first = asyncio.run(spend(10, close=False))  # killed: never gives its block back
    second = asyncio.run(spend(2000, close=True))
    assert first == 10 and 1000 - 64 <= first + second < 1000


ROW = BudgetKey.for_model("key:k1", "m", "epsilon", 3600)


def _key(name: str) -> bytes:
    return AnswerCache.key(ROW, "sha256:m", name, policy_tag("dp_scores", "laplace", 1.0, 1e-6))


def test_answer_cache_expires_and_stays_bounded() -> None:
    cache = AnswerCache(max_entries=2)
    scores = np.array([[0.25, 0.75]])
    cache.put(_key("a"), scores, expires=10.0)
    np.testing.assert_array_equal(cache.get(_key("a"), now=5.0), scores)
    assert cache.get(_key("a"), now=10.0) is None
    assert len(cache) == 0  # an expired answer is dropped when it is next asked for
    for k in ("b", "c", "d"):
        cache.put(_key(k), scores * 2, expires=100.0)
    assert cache.get(_key("b"), now=1.0) is None  # oldest evicted first
    np.testing.assert_array_equal(cache.get(_key("c"), now=1.0), scores * 2)
    np.testing.assert_array_equal(cache.get(_key("d"), now=1.0), scores * 2)


def test_answer_cache_keeps_the_latest_half_of_its_bound_however_many_answers_pass() -> None:
    cache = AnswerCache(max_entries=100)
    for i in range(1000):
        cache.put(_key(str(i)), np.array([[i / 1000, 1 - i / 1000]]), expires=1e9)
        assert len(cache) <= 100
    for i in range(950, 1000):
        answer = cache.get(_key(str(i)), now=0.0)
        assert answer is not None and answer[0, 0] == i / 1000
    assert all(cache.get(_key(str(i)), now=0.0) is None for i in range(900))


def test_answer_cache_keys_separate_budget_rows_models_inputs_and_parameters() -> None:
    """An answer is served again only against the ledger row that paid for it: another principal,
    another model's row, another unit or another window (another grant) is another key."""
    base = (ROW, "sha256:m", "h" * 64, policy_tag("dp_scores", "laplace", 0.1, 1e-6))
    variants = [
        (BudgetKey.for_model("key:k2", "m", "epsilon", 3600), *base[1:]),
        (BudgetKey.for_model("key:k1", "n", "epsilon", 3600), *base[1:]),
        (BudgetKey.for_model("key:k1", "m", "rho", 3600), *base[1:]),
        (BudgetKey.for_model("key:k1", "m", "epsilon", 86_400), *base[1:]),
        (BudgetKey.for_model("*", "m", "epsilon", 3600), *base[1:]),
        (base[0], "sha256:n", *base[2:]),
        (*base[:2], "g" * 64, base[3]),
        (*base[:3], policy_tag("dp_scores", "laplace", 0.1000001, 1e-6)),
        (*base[:3], policy_tag("dp_scores", "gaussian", 0.1, 1e-6)),
        (*base[:3], policy_tag("pate", 0.1)),
    ]
    keys = {AnswerCache.key(*base), *(AnswerCache.key(*v) for v in variants)}
    assert len(keys) == 1 + len(variants)
    assert AnswerCache.key(*base) == AnswerCache.key(*base)


@pytest.mark.parametrize(
    ("classes", "mechanism"), [(2, "laplace"), (10, "laplace"), (2, "gaussian"), (10, "gaussian")]
)
def test_noise_calibration_meets_epsilon_by_opendps_own_accounting(classes: int, mechanism: str) -> None:
    """The scale we hand the sampler, checked against OpenDP's privacy map on the integer grid it samples on."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    fake = NoNoise()
    fake.resolution = 2.0**-20
    epsilon, delta = 0.7, 1e-6
    dp_scores(
        _random_probabilities(2, classes), mechanism=mechanism, epsilon=epsilon, delta=delta, noise=fake
    )
    released = 1 if classes == 2 else classes  # a binary answer releases p1 alone
    grid_scale = fake.scales[0] * 2**20
    ints = dp.vector_domain(dp.atom_domain(T="i64"), size=released)
    if mechanism == "laplace":
        # Neighbouring answers move <= 1 (binary: p1) or 2 (L1, all classes), plus half a grid step per value each side.
        d_in = (1 if classes == 2 else 2) * 2**20 + released
        m = (ints, dp.l1_distance(T="i64")) >> dp.m.then_laplace(scale=grid_scale)
        assert m.map(d_in) <= epsilon * (1 + 1e-9)
    else:
        d_in = math.ceil((1 if classes == 2 else math.sqrt(2)) * 2**20 + math.sqrt(released))
        m = (ints, dp.l2_distance(T="i64")) >> dp.m.then_gaussian(scale=grid_scale)
        rho = m.map(d_in)
        # The classic calibration gives (epsilon, delta); its zCDP rho converts to at most that epsilon at delta.
        assert rho + 2 * math.sqrt(rho * math.log(1 / delta)) <= epsilon * 1.2


def test_binary_answers_release_one_noisy_score_that_sums_to_one() -> None:
    noise = OpenDPNoise()
    p = _random_probabilities(50, 2, seed=3)
    for rows in (p[:1], p):  # the small-request path and the vector path
        noisy = dp_scores(rows, mechanism="laplace", epsilon=1.0, delta=1e-6, noise=noise)
        assert noisy.shape == rows.shape
        np.testing.assert_allclose(noisy.sum(axis=1), 1.0)
        assert ((noisy >= 0) & (noisy <= 1)).all()
    fake = NoNoise()
    dp_scores(p, mechanism="laplace", epsilon=0.5, delta=1e-6, noise=fake)
    assert fake.scales == [2.0]  # sensitivity 1 (not 2) for p1 alone


def test_noise_pool_never_reuses_a_sample_across_refills() -> None:
    noise = OpenDPNoise()
    drawn = [
        noise.laplace(np.zeros((1, 1)), 1e6).item() for _ in range(3000)
    ]  # ~3 pools, refilled on a thread
    assert len(set(drawn)) > 2990  # a wide scale: repeats would mean a sample was handed out twice


def test_dp_values_calibrate_to_the_declared_range_and_stay_inside_it() -> None:
    import opendp.prelude as dp

    dp.enable_features("contrib")
    values = np.array([[-50.0], [0.0], [120.0], [400.0], [999.0]])  # two outside the range
    fake = NoNoise()
    fake.resolution = 2.0**-20
    exact = dp_values(
        values, value_range=(0.0, 400.0), mechanism="laplace", epsilon=0.5, delta=1e-6, noise=fake
    )
    np.testing.assert_allclose(exact.ravel(), [0.0, 0.0, 120.0, 400.0, 400.0])  # clamped, not passed through
    # In [0, 1] units one row moves a value by at most 1, plus half a grid step each side.
    ints = dp.vector_domain(dp.atom_domain(T="i64"), size=5)
    m = (ints, dp.l1_distance(T="i64")) >> dp.m.then_laplace(scale=fake.scales[0] * 2**20)
    assert m.map(2**20 + 1) <= 0.5 * (1 + 1e-9)
    noisy = dp_values(
        values, value_range=(0.0, 400.0), mechanism="gaussian", epsilon=1.0, delta=1e-6, noise=OpenDPNoise()
    )
    assert ((noisy >= 0.0) & (noisy <= 400.0)).all() and not np.allclose(noisy, exact)


def test_blocks_leased_ahead_are_counted_and_given_back(tmp_path: Path) -> None:
    """With plenty left, the next block is leased in the background before this one runs out: after
    the first, no answer waits on the ledger, and on shutdown the file holds exactly what was spent."""
    needs: list[float] = []

    class CountingLedger(SQLiteLedger):
        async def take(self, *args, need: float, **kwargs):  # type: ignore[no-untyped-def]
            needs.append(need)
            return await super().take(*args, need=need, **kwargs)

    async def run() -> int:
        store = LeasedStateStore(CountingLedger(tmp_path / "s.db"))
        ok = 0
        for _ in range(1000):
            ok += (
                await store.spend_budget(BudgetKey("p", "m/epsilon", 100), cost=1.0, limit=10_000.0, now=1.0)
            ).allowed
            await asyncio.sleep(0)  # let a background lease finish, as it would between requests
        await store.aclose()
        return ok

    assert asyncio.run(run()) == 1000
    assert needs[0] == 1.0 and len(needs) > 10 and all(n == 0.0 for n in needs[1:])  # on demand once
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("SELECT spent FROM privacy_budget").fetchone()[0] == pytest.approx(1000.0)
