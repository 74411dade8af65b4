"""``python -m parrun demo`` runs real parallel work and prints what it measured;
``python -m parrun info`` describes the machine and what parrun would use on it."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import parrun
from parrun.bench import _chain_into, positive_int, timeit

TILE = 65536


def _uneven(idx: np.ndarray) -> np.ndarray:
    """Work that grows with the index: item i sums sqrt over i * 200 numbers."""
    out = np.empty(len(idx))
    for j, i in enumerate(idx):
        out[j] = np.sqrt(np.arange(1 + int(i) * 200, dtype=np.float64)).sum()
    return out


def _median_time(fn, repeat: int) -> float:
    return timeit(fn, repeat)[0]


def cmd_info(args: argparse.Namespace) -> int:
    from .bench import machine_info

    for k, v in machine_info().items():
        print(f"{k:>24}: {v}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    n = args.n
    workers = args.workers if args.workers is not None else parrun.default_workers()
    print(f"parrun {parrun.__version__} demo: {workers} workers, numpy {np.__version__}, "
          f"{n:,} float32 elements ({n * 4 / 2**20:.0f} MiB)")
    t0 = time.perf_counter()
    pool = parrun.Pool(workers)
    print(f"pool start-up: {(time.perf_counter() - t0) * 1e3:.0f} ms "
          f"({pool.start_method}), worker pids {pool.pids}")
    try:
        rng = np.random.default_rng(0)
        x = parrun.asshared(rng.standard_normal(n, dtype=np.float32))
        out = parrun.empty(n, np.float32)
        ref = np.empty(n, np.float32)

        def serial():
            for lo in range(0, n, TILE):
                _chain_into(x[lo:lo + TILE], ref[lo:lo + TILE])

        def natural():
            return np.tanh(1.7 * x + 0.3) ** 2 - 0.5 * x

        print("\n1. y = tanh(1.7 x + 0.3)**2 - 0.5 x over the whole array "
              f"(median of {args.repeat})")
        t_nat = _median_time(natural, args.repeat)
        t_ser = _median_time(serial, args.repeat)
        t_par = _median_time(lambda: pool.map(_chain_into, x, out=out), args.repeat)
        err = float(np.max(np.abs(out - ref)))
        st = pool.last_stats
        assert st is not None  # the pool has run a map
        print(f"   {'plain NumPy, whole array':<32}{t_nat:8.4f} s")
        print(f"   {'serial NumPy, 64K tiles':<32}{t_ser:8.4f} s")
        print(f"   {f'parrun.map, {workers} workers':<32}{t_par:8.4f} s   "
              f"{t_ser / t_par:.2f}x serial tiles, {t_nat / t_par:.2f}x plain NumPy, "
              f"{2 * n * 4 / t_par / 1e9:.1f} GB/s")
        print(f"   max |parrun - serial| = {err:.2e}; {st.pieces} piece"
              f"{'s' * (st.pieces != 1)}, {st.steals} steal{'s' * (st.steals != 1)}")

        m = args.tasks
        idx = parrun.asshared(np.arange(m))
        print(f"\n2. uneven work: {m} items, item i costs ~i (work stealing balances it)")
        t_ser2 = _median_time(lambda: _uneven(idx), 3)
        with parrun.Pool(1) as one:
            t_one = _median_time(lambda: one.map(_uneven, idx), 3)
        t_par2 = _median_time(lambda: pool.map(_uneven, idx), 3)
        ok = np.allclose(pool.map(_uneven, idx), _uneven(idx))
        st = pool.last_stats
        print(f"   serial {t_ser2:.3f} s, parrun 1 worker {t_one:.3f} s, {workers} workers "
              f"{t_par2:.3f} s: {t_ser2 / t_par2:.2f}x serial; parallel efficiency "
              f"{t_one / (workers * t_par2):.2f} (1-worker time / ({workers} x time)); "
              f"results match: {ok}")
        print("   " + str(st).replace("\n", "\n   "))
        x.release()
        out.release()
        idx.release()
        return 0 if err < 1e-5 and ok else 1
    finally:
        pool.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parrun", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run real parallel work and print what it measured")
    d.add_argument("--n", type=positive_int, default=2**25, help="array elements (default 2**25)")
    d.add_argument("--workers", type=positive_int, default=None)
    d.add_argument("--repeat", type=positive_int, default=5)
    d.add_argument("--tasks", type=positive_int, default=600, help="items of the uneven workload")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("info", help="describe this machine and parrun's defaults")
    i.set_defaults(func=cmd_info)
    sub.add_parser("bench", help="core scaling with the peers (see python -m parrun bench -h)",
                   add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from . import bench

        return bench.main(argv[1:])
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # a bad setting (PARRUN_NUM_WORKERS, a flag's value): one line
        ap.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
