"""The work-stealing scheduler: take / steal on one control block, and the exactly-once
guarantee on real processes (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parrun
from parrun._scheduler import ControlBlock, control_size, initial_ranges


def block(nslots: int) -> ControlBlock:
    return ControlBlock(bytearray(control_size(nslots)), -1, nslots)


def test_take_from_own_range_then_steal_upper_half():
    cb = block(2)
    cb.start_job([(0, 10), (10, 100)])
    assert cb.take(0, 4) == (0, 4)
    assert cb.take(0, 4) == (4, 8)
    assert cb.take(0, 4) == (8, 10)
    # Own range empty: steal the upper half of slot 1's [10, 100) and take from it.
    assert cb.take(0, 4) == (55, 59)
    assert cb.get(1, 1) == 55  # slot 1 keeps [10, 55)
    assert cb.slot_stats(0)[2] == 1


def test_steal_picks_the_fullest_victim():
    cb = block(3)
    cb.start_job([(0, 0), (0, 10), (10, 50)])
    assert cb.take(0, 100) == (30, 50)


def test_all_items_taken_exactly_once_in_one_process():
    cb = block(4)
    n = 1003
    cb.start_job(initial_ranges(n, 0, 4))
    seen = np.zeros(n, int)
    order = [3, 3, 1, 0, 2, 2, 2, 1]
    i = 0
    while True:
        me = order[i % len(order)]
        i += 1
        piece = cb.take(me, 7)
        if piece is None:
            if all(cb.take(k, 7) is None for k in range(4)):
                break
            continue
        lo, hi = piece
        seen[lo:hi] += 1
        cb.done_piece(me, lo, hi, 1)
    assert (seen == 1).all()


def test_abort_stops_taking():
    cb = block(1)
    cb.start_job([(0, 100)])
    cb.abort()
    assert cb.take(0, 10) is None


def test_unfinished_reports_current_piece_and_rest():
    cb = block(2)
    cb.start_job([(0, 100), (100, 200)])
    assert cb.take(1, 10) == (100, 110)
    assert cb.unfinished(1) == [(100, 110), (110, 200)]
    cb.done_piece(1, 100, 110, 5)
    assert cb.unfinished(1) == [(110, 200)]


def test_initial_ranges_cover_everything():
    for n, start, w in [(10, 0, 3), (10, 4, 4), (0, 0, 2), (5, 5, 2)]:
        rs = initial_ranges(n, start, w)
        assert len(rs) == w
        covered = [i for lo, hi in rs for i in range(lo, hi)]
        assert covered == list(range(start, n))


@pytest.fixture(scope="module")
def pools():
    made = {w: parrun.Pool(w) for w in (1, 2, 3)}
    yield made
    for p in made.values():
        p.close()


def _counting(counts, costs):
    def fn(idx):
        # Uneven per-item cost: a busy loop whose length the item's cost sets.
        for c in costs[idx]:
            if c:
                np.sqrt(np.arange(int(c) * 200, dtype=np.float64)).sum()
        np.add.at(counts, idx, 1)
        return idx * 2
    return fn


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n=st.integers(0, 3000), workers=st.sampled_from([1, 2, 3]),
       grain=st.one_of(st.none(), st.integers(1, 400)),
       cost=st.sampled_from(["flat", "rising", "spiky"]), seed=st.integers(0, 2**16))
def test_every_index_runs_exactly_once(pools, n, workers, grain, cost, seed):
    rng = np.random.default_rng(seed)
    costs = {"flat": np.zeros(n), "rising": np.arange(n) / max(n, 1) * 20,
             "spiky": (rng.random(n) < 0.02) * 300.0}[cost]
    with parrun.zeros(n, np.int64) as counts, \
            parrun.asshared(np.arange(n, dtype=np.int64)) as idx, \
            parrun.asshared(costs) as shared_costs:
        pool = pools[workers]
        out = pool.map(_counting(counts, shared_costs), idx, grain=grain)
        try:
            assert (counts == 1).all(), np.flatnonzero(counts != 1)[:10]
            np.testing.assert_array_equal(out, 2 * np.arange(n))
            st_ = pool.last_stats
            assert st_.items == n
            assert sum(w.items for w in st_.workers) == n  # the probe's rows too
        finally:
            out.release()


def _count_task(counts, i, cost):
    if cost:
        np.sqrt(np.arange(int(cost) * 200, dtype=np.float64)).sum()
    counts[i] += 1
    return i


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n=st.integers(0, 1500), workers=st.sampled_from([1, 2, 3]),
       burst=st.integers(1, 500), cost=st.sampled_from(["flat", "rising", "spiky"]),
       seed=st.integers(0, 2**16))
def test_every_task_runs_exactly_once(pools, n, workers, burst, cost, seed):
    """Tasks submitted in bursts (the parent adds to ranges while workers take and steal
    from them) each run once and deliver their own result."""
    rng = np.random.default_rng(seed)
    costs = {"flat": np.zeros(n), "rising": np.arange(n) / max(n, 1) * 20,
             "spiky": (rng.random(n) < 0.02) * 300.0}[cost]
    pool = pools[workers]
    with parrun.zeros(max(n, 1), np.int64) as counts:
        futures = []
        for lo in range(0, n, burst):
            futures += [pool.submit(_count_task, counts, i, costs[i])
                        for i in range(lo, min(n, lo + burst))]
        assert [f.result(timeout=60) for f in futures] == list(range(n))
        assert (counts[:n] == 1).all(), np.flatnonzero(counts[:n] != 1)[:10]
