"""Soak: many maps and submitted tasks of random sizes on one pool. Memory (RSS) and open
descriptors of the parent and of every worker stay flat after warm-up, and /dev/shm returns
to its starting count. CI runs a tenth of the counts; ``pytest -m slow`` runs 5,000 maps and
100,000 tasks."""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import random
import time

import numpy as np
import psutil
import pytest
from conftest import TIMEOUT, shm_segments

import parrun


def chain(x):
    return np.tanh(1.7 * x + 0.3) ** 2 - 0.5 * x


def _task(a, k):
    return a * k if isinstance(a, np.ndarray) else (a, k)


def _malloc_trim() -> None:
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; musl has none
    if trim is not None:
        trim(0)


def _trim(flags: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Give the heap's free pages back to the system (glibc), then wait until every worker
    has: a worker waiting here cannot take another piece, so each runs exactly one."""
    _malloc_trim()
    flags[int(idx[0])] = 1
    deadline = time.monotonic() + TIMEOUT
    while not flags.all():
        if time.monotonic() > deadline:
            raise TimeoutError("a worker never took its malloc_trim")
        time.sleep(0.001)
    return idx


def snapshot(pool: parrun.Pool) -> dict:
    """RSS and open descriptors of the parent and each worker, after each gave its heap's
    free pages back: RSS is then what is live, not the heap's high-water mark (which steps
    up by a few percent once or twice in a long run, as glibc raises its mmap threshold: a
    worker's went 41.5, 41.5, 43.4, 43.4, 43.4, 43.4 MiB)."""
    n = len(pool.pids)
    flags, idx = parrun.zeros(n, np.int8), parrun.empty(n, np.int64)
    try:  # ``out`` given: no first piece run alone
        pool.map(functools.partial(_trim, flags), np.arange(n), out=idx, grain=1)
    finally:
        flags.release()
        idx.release()
    _malloc_trim()
    out = {}
    for role, pid in [("parent", os.getpid())] + [(f"worker{k}", p)
                                                   for k, p in enumerate(pool.pids)]:
        p = psutil.Process(pid)
        out[role] = {"rss": p.memory_info().rss, "fds": p.num_fds()}
    return out


def soak(pool: parrun.Pool, maps: int, tasks: int, seed: int) -> None:
    rng = random.Random(seed)
    flush_in = parrun.asshared(np.ones(64))
    flush_out = parrun.empty(64)
    try:
        for i in range(maps):
            n = rng.choice([1, 10, 1000, 50_000, 200_000])
            x = np.random.default_rng(i).standard_normal((n, rng.choice([1, 3])))
            if rng.random() < 0.5:
                x = parrun.asshared(x)
            y = pool.map(chain, x, grain=rng.choice([None, None, 64]))
            if i % 50 == 0:
                np.testing.assert_allclose(y, chain(x), rtol=1e-12)
            y.release()
            if isinstance(x, parrun.SharedArray):
                x.release()
        done = 0
        while done < tasks:
            batch = min(tasks - done, rng.choice([1, 10, 500, 2000]))
            fs = []
            for j in range(batch):
                size = rng.choice([0, 10, 1000, 1 << 17])  # 1 MiB arrays: temp segments
                arg = np.full(size, 1.0) if size else j
                fs.append(pool.submit(_task, arg, 2))
            for j, f in enumerate(fs[:3]):
                r = f.result(timeout=TIMEOUT)
                assert r[0] == j if isinstance(r, tuple) else (r == 2).all()
            for f in fs:
                f.result(timeout=TIMEOUT)
            del fs, f
            done += batch
    finally:
        pool.map(np.negative, flush_in, out=flush_out)  # workers drop released segments
        flush_in.release()
        flush_out.release()
    pool.map(np.negative, np.ones(8)).release()
    gc.collect()


def run_soak(maps: int, tasks: int, parts: int = 6) -> dict:
    """Warm up, then soak in ``parts`` parts with a snapshot after each. Growth compares the
    median of the last three snapshots with the median of the first three (one snapshot
    swings by a few MiB with the heap; a leak grows part after part)."""
    with parrun.Pool(2) as pool:
        pids = [os.getpid(), *pool.pids]
        shm_before = sorted({n for p in pids for n in shm_segments(p)} - pool._own_segments())
        soak(pool, maps // 10, tasks // 10, seed=0)  # warm-up: every size, every path
        snaps = []
        for part in range(parts):
            soak(pool, maps // parts, tasks // parts, seed=1 + part)
            snaps.append(snapshot(pool))
        assert pool.pids == pids[1:]  # no worker was lost on the way
        # The pool's own segments (control block, task arena) aside.
        shm_after = sorted({n for p in pids for n in shm_segments(p)} - pool._own_segments())
    growth = {}
    for role in snaps[0]:
        first = float(np.median([s[role]["rss"] for s in snaps[:3]]))
        last = float(np.median([s[role]["rss"] for s in snaps[-3:]]))
        growth[role] = {"rss": round(last / first - 1, 4),
                        "fds": max(s[role]["fds"] for s in snaps[-3:])
                        - max(s[role]["fds"] for s in snaps[:3])}
    report = {"maps": maps, "tasks": tasks, "growth": growth,
              "rss_mib": {r: [round(s[r]["rss"] / 2**20, 1) for s in snaps] for r in snaps[-1]},
              "fds": {r: snaps[-1][r]["fds"] for r in snaps[-1]},
              "shm_before": len(shm_before), "shm_after": len(shm_after)}
    print(f"\nsoak: {report}")
    for role, g in growth.items():
        assert g["rss"] < 0.05, (role, report)
        assert g["fds"] <= 0, (role, report)
    assert shm_after == shm_before
    return report


def test_soak_ci():
    run_soak(maps=600, tasks=12_000)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_soak_long():
    run_soak(maps=5000, tasks=100_000)
