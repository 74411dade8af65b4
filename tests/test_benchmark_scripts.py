"""The scripts in ``benchmarks/`` run, at sizes small enough for CI, and report real numbers:
they import the bench's internals, and a rename there would otherwise break them unseen."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import shm_segments, take_down_if_hung

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, code: int = 0) -> subprocess.CompletedProcess:
    p = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        out, err = p.communicate(timeout=150)
    finally:
        take_down_if_hung(p)  # with its pools' workers
    assert p.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not shm_segments(p.pid), "a segment outlived it"
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.timeout(180)
def test_bench_irregular(tmp_path):
    out = tmp_path / "i.json"
    r = _run("bench_irregular.py", "--items", "60", "--trials", "2", "--repeat", "1",
             "--json", str(out))
    data = json.loads(out.read_text())
    assert data["workers"] == 2 and data["items"] == 60 and len(data["trials"]) == 2
    for trial in data["trials"]:
        assert {"serial Python", "parrun.map (work stealing)", "static cyclic split",
                "multiprocessing.Pool.map default chunks"} <= set(trial)
        assert all(t > 0 for t in trial.values())
    assert "efficiency: median" in r.stdout and "steals" in r.stdout
    # parrun's efficiency split into the machine's part and the scheduler's
    assert "parrun's last map a trial, efficiency" in r.stdout
    assert [set(m) for m in data["parrun_last_map"]] == [{"items_s", "wall_s"}] * 2


@pytest.mark.timeout(180)
def test_bench_map(tmp_path):
    out = tmp_path / "m.json"
    r = _run("bench_map.py", "--n", "65536", "--repeat", "1", "--skip-slow", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["n"] == 65536
    times = data["timings_s"]
    assert any(k.startswith("parrun.map 2 workers") for k in times)
    assert all(t > 0 for ts in times.values() for t in ts)
    assert "parrun 2 workers" in r.stdout


@pytest.mark.timeout(180)
def test_bench_tasks(tmp_path):
    out = tmp_path / "t.json"
    _run("bench_tasks.py", "--tasks", "200", "--trips", "50", "--items", "1000", "--repeat", "1",
         "--json", str(out))
    data = json.loads(out.read_text())
    for peer in ("parrun.Executor", "ProcessPoolExecutor", "multiprocessing.Pool"):
        assert data[peer]["tasks_per_s"] > 0 and data[peer]["map_items_per_s"] > 0, peer


@pytest.mark.timeout(180)
def test_bench_first_call():
    r = _run("bench_first_call.py", "--calls", "1", "--trivial-calls", "20")
    assert "nn.mandelbrot" in r.stdout and "median of 20 calls" in r.stdout


@pytest.mark.timeout(180)
def test_bench_dask(tmp_path):
    pytest.importorskip("distributed")
    out = tmp_path / "d.json"
    r = _run("bench_dask.py", "--repeat", "1", "--map-size", "65536", "--mlp", "64,32,64,32",
             "--round-trips", "10", "--json", str(out))
    data = json.loads(out.read_text())
    assert len(data["nthreads"]) == 2  # a real cluster of two workers
    assert {"task round trip (x10)", "map chain, 0 MiB float32"} <= {
        row["workload"] for row in data["rows"]}
    assert all(row["local_median_s"] > 0 and row["dask_median_s"] > 0 for row in data["rows"])
    assert "dask/local" in r.stdout


@pytest.mark.timeout(180)
def test_bench_cores(tmp_path):
    """Independent processes per kernel: every process's time for every round, and (with
    ``--pairs``) the pinned pairs' slowdowns, for the CPUs this process may run on."""
    out = tmp_path / "c.json"
    r = _run("bench_cores.py", "--workers", "1,2", "--kernels", "python,copy", "--repeat", "2",
             "--pairs", "--json", str(out))
    data = json.loads(out.read_text())
    assert set(data["kernels"]) == {"python", "copy"}
    for rows in data["kernels"].values():
        assert set(rows) == {"1", "2"}
        for w, times in rows.items():  # a list of rounds for each of the w processes
            assert len(times) == int(w) and all(len(t) == 2 for t in times)
            assert all(t > 0 for proc in times for t in proc)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        pairs = data["pairs"]["python"]
        assert pairs["cpu"] == cpus[0] and set(pairs["slowdown"]) == {str(c) for c in cpus[1:]}
        assert all(s > 0 for s in pairs["slowdown"].values())
        assert "pairs: slowdown" in r.stdout
    assert "speed-up" in r.stdout and "GB/s" in r.stdout


def test_bench_cores_names_a_bad_argument():
    r = _run("bench_cores.py", "--kernels", "python,fft", code=2)
    assert "--kernels: unknown fft; choose from python, sgemm, mandelbrot, copy" in r.stderr
    for bad in ("0,2", "two"):
        r = _run("bench_cores.py", "--workers", bad, code=2)
        assert f"--workers: positive integers separated by commas, got '{bad}'" in r.stderr
    r = _run("bench_cores.py", "--repeat", "0", code=2)
    assert "--repeat: a positive integer, got 0" in r.stderr


@pytest.mark.timeout(120)
def test_bench_cores_measures_one_process_first(tmp_path):
    """Speed-ups are over 1 process: it is measured even where --workers leaves it out (they
    were over the first count given: 2 processes read as perfect scaling)."""
    out = tmp_path / "c.json"
    r = _run("bench_cores.py", "--workers", "2", "--kernels", "copy", "--repeat", "1",
             "--json", str(out))
    assert set(json.loads(out.read_text())["kernels"]["copy"]) == {"1", "2"}
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert [ln[0] for ln in lines][-2:] == ["1", "2"] and lines[-2][3] == "1.00x"


@pytest.mark.timeout(180)
def test_bench_mlp_slices(tmp_path):
    out = tmp_path / "s.json"
    r = _run("bench_mlp_slices.py", "--cases", "64:2,100:3", "--size", "32,96", "--repeat",
             "2", "--json", str(out))
    cases = json.loads(out.read_text())["cases"]
    assert [(c["rows"], c["slices"]) for c in cases] == [(64, 2), (100, 3)]
    for c in cases:
        assert set(c["times_s"]) == {"1", str(c["slices"])}
        assert all(len(ts) == 2 and min(ts) > 0 for ts in c["times_s"].values())
    assert "100 rows, hidden_slices=3" in r.stdout
    r = _run("bench_mlp_slices.py", "--cases", "64:0", code=2)
    assert "--cases: rows:slices pairs of positive integers, got '64:0'" in r.stderr
    r = _run("bench_mlp_slices.py", "--cases", "64:1,8:200", "--size", "32,96", code=2)
    assert "--cases: slices from 2 to d_hidden (96), got 64:1, 8:200" in r.stderr
    for bad in ("32", "32,x", "0,96"):
        r = _run("bench_mlp_slices.py", "--size", bad, code=2)
        assert f"--size: d,h, two positive integers, got '{bad}'" in r.stderr


def test_bench_small(tmp_path):
    out = tmp_path / "s.json"
    r = _run("bench_small.py", "--calls", "5", "--warm", "3", "--sizes", "1e3,2e3", "--json",
             str(out))
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 9 and "submit(pow, 2, 3)" in cases
    assert "sqrt, no out, released, 2e+03" in cases
    for res in cases.values():
        assert set(res) == {"parrun", "serial", "threads"}
        assert all(0 < v["min_us"] <= v["median_us"] for v in res.values())
    assert "chain, out, 2e+03" in r.stdout and "parrun / threads" in r.stdout
    r = _run("bench_small.py", "--sizes", "1", code=2)
    assert "each at least --workers (2)" in r.stderr


@pytest.mark.timeout(180)
def test_bench_pieces(tmp_path):
    out = tmp_path / "p.json"
    r = _run("bench_pieces.py", "--scale", "0.02", "--repeat", "1", "--json", str(out))
    cases = json.loads(out.read_text())["cases"]
    assert [c["rows"] for c in cases] == [160, 400, 20]
    for c in cases:
        assert len(c["times_s"]) == 2 and all(min(ts) > 0 for ts in c["times_s"].values())
        assert all(p >= 1 for p in c["pieces"].values())
    assert "a @ W, 160 x 1000 float64" in r.stdout and "pieces" in r.stdout
    r = _run("bench_pieces.py", "--scale", "0", code=2)
    assert "--workers, --repeat and --scale must be positive" in r.stderr


def test_bench_nn_names_an_unknown_workload():
    """(Its workloads take a minute even once each: the suite's nn workloads are tested in
    test_bench.py.)"""
    r = _run("bench_nn.py", "--only", "mlp,inference", code=2)
    assert "--only: unknown inference; choose from mlp, attention, minilm, mandelbrot" in r.stderr


@pytest.mark.timeout(180)
def test_bench_irregular_leaves_joblib_out_at_one_worker(tmp_path):
    """joblib runs ``n_jobs=1`` in the calling process: at one worker it is not a process
    peer, so it is left out (it came out "fastest", beside processes)."""
    out = tmp_path / "i.json"
    r = _run("bench_irregular.py", "--workers", "1", "--items", "40", "--trials", "1",
             "--repeat", "1", "--json", str(out))
    (trial,) = json.loads(out.read_text())["trials"]
    assert "parrun.map (work stealing)" in trial and "joblib auto batching" not in trial
    if importlib.util.find_spec("joblib") is not None:
        assert "joblib left out at 1 worker" in r.stdout


def _script(monkeypatch, name: str):
    """benchmarks/<name>.py as a module (without the variables that make its main re-exec)."""
    for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        monkeypatch.delenv(v, raising=False)
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_map(monkeypatch):
    return _script(monkeypatch, "bench_map")


@pytest.mark.timeout(60)
def test_bench_cores_says_at_once_what_a_process_hit(monkeypatch):
    """A process that fails (here building its job's inputs) breaks the barrier: the others
    stop waiting at once (they waited BARRIER_TIMEOUT, 120 s, then the parent read a bare
    EOFError), and the error names the kernel and what went wrong."""
    bc = _script(monkeypatch, "bench_cores")

    def no_room():
        if os.getpid() % 2:  # one process in two, about
            raise MemoryError("no room for the job")
        return lambda: None

    monkeypatch.setitem(bc.KERNELS, "no_room", no_room)
    monkeypatch.setattr(bc, "BARRIER_TIMEOUT", 50.0)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no_room x 4 processes: MemoryError: no room"):
        for _ in range(5):  # until some process's pid is odd
            bc.together("no_room", 4, 2)
    assert time.monotonic() - t0 < 20


def test_bench_map_fails_a_method_that_writes_nothing(monkeypatch):
    """The methods share ``out``: one that wrote nothing passed the check on the numbers the
    method before it left there."""
    bm = _bench_map(monkeypatch)
    x = np.random.default_rng(0).standard_normal(3 * bm.TILE, dtype=np.float32)
    ref = np.empty_like(x)
    bm.serial_tiled(x, ref)
    out = ref.copy()  # as the method before left it
    with pytest.raises(AssertionError, match="nothing: max abs error nan"):
        bm.timed_and_checked("nothing", lambda: None, 1, out, ref, lambda: out)
    ts = bm.timed_and_checked("tiles", lambda: bm.serial_tiled(x, out), 2, out, ref,
                              lambda: out)
    assert len(ts) == 2


@pytest.mark.parametrize("script,args", [("bench_map.py", ("--repeat", "0")),
                                         ("bench_map.py", ("--n", "0")),
                                         ("bench_irregular.py", ("--workers", "0")),
                                         ("bench_irregular.py", ("--trials", "0")),
                                         ("bench_tasks.py", ("--repeat", "0")),
                                         ("bench_small.py", ("--calls", "0"))])
def test_scripts_refuse_counts_below_one_with_a_usage_error(script, args):
    # They crashed (StatisticsError, IndexError, "min() arg is an empty sequence").
    r = _run(script, *args, code=2)
    assert f"argument {args[0]}: needs at least 1, got 0" in r.stderr, r.stderr[-2000:]
