"""``python -m parrun bench --quick``: the CI smoke test of the scaling benchmark."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TIMEOUT, cmdline, shm_segments, take_down_if_hung, wait_until

import parrun.bench


def test_quick_bench_runs_every_suite_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "parrun", "bench", "--quick", "--workers", "1,2",
                        "--json", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=150)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert elapsed < 60, f"--quick took {elapsed:.0f} s"
    data = json.loads(out.read_text())
    assert set(data["workloads"]) == set(parrun.bench.SUITES)
    assert data["machine"]["logical_cores"] >= 1 and "blas" in data["machine"]
    assert data["config"]["workers"] == [1, 2]
    assert (data["config"]["repeat"], data["config"]["warmup"]) == (2, 1)  # --quick's
    pm = data["workloads"]["map"]["methods"]["parrun.map"]["times_s"]
    assert set(pm) == {"1", "2"} and all(t > 0 for ts in pm.values() for t in ts)
    irregular = data["workloads"]["irregular"]["methods"]
    assert "parrun.map (work stealing)" in irregular and "static cyclic split" in irregular
    for name in ("mlp", "attention", "mandelbrot"):  # the hand-split peers ran too
        methods = data["workloads"][name]["methods"]
        for peer in ("ThreadPoolExecutor, 4 blocks a thread",
                     "multiprocessing.Pool, pickled blocks",
                     "ProcessPoolExecutor, pickled blocks"):
            assert set(methods[peer]["times_s"]) == {"1", "2"}, (name, peer)
    for peer in ("ProcessPoolExecutor.map", "ThreadPoolExecutor.map (the GIL)"):
        assert set(irregular[peer]["times_s"]) == {"1", "2"}, peer
    peers = {"map": ("mpire, inherited input, 4 MiB blocks", "ray, object store, 4 MiB blocks"),
             "tasks": ("mpire apply_async", "ray tasks"),
             "irregular": ("mpire map default chunks", "ray, a task per item"),
             "mlp": ("mpire, inherited blocks", "ray, object store blocks")}
    for name, (mpire_row, ray_row) in peers.items():  # reported, run or skipped, never dropped
        methods = data["workloads"][name]["methods"]
        if _installed("mpire"):
            assert set(methods[mpire_row]["times_s"]) == {"1", "2"}, (name, mpire_row)
        else:
            assert methods[mpire_row] == {"skipped": "not installed"}
        assert methods[ray_row]["skipped"].startswith(
            "left out of --quick" if _installed("ray") else "not installed")
    for name in parrun.bench.SUITES:
        assert f"\n{name}: " in r.stdout  # a table per workload
    assert "speed-up" in r.stdout and "vs best peer" in r.stdout
    assert data["command"] == ["python", "-m", "parrun", "bench", "--quick", "--workers", "1,2",
                               "--json", str(out), "--no-progress"]
    started = datetime.datetime.fromisoformat(data["started"])
    assert abs(started.timestamp() - (time.time() - elapsed)) < 30


def _signal_and_wait(p: subprocess.Popen, sig: int, group: bool) -> tuple[str, float]:
    """Send ``sig`` to a bench (to its whole process group if ``group``); its stderr and the
    seconds it took to exit."""
    if group:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=30)
    return err, time.monotonic() - t0


def _stop_joblib() -> None:
    if _installed("joblib"):
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)


def _installed(pkg: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(pkg) is not None


@pytest.mark.timeout(90)
def test_split_peers_compute_what_the_reference_computes():
    """The nn workloads' hand-split peers (threads, multiprocessing.Pool, joblib, mpire, Ray)
    and the equal static shares: each fills its output with the serial reference's numbers,
    so the bench compares like with like."""
    from parrun import nn
    from parrun.nn import _mandelbrot as M

    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 16), dtype=np.float32)
    weights = (rng.standard_normal((16, 32), dtype=np.float32), np.zeros(32, np.float32),
               rng.standard_normal((32, 16), dtype=np.float32), np.ones(16, np.float32))
    q, k, v = (rng.standard_normal((6, 40, 8), dtype=np.float32) for _ in range(3))
    # (fn, inputs, consts, the kernel the equal static shares run, reference)
    cases = [(nn.mlp_reference, (x,), weights, nn.mlp_reference, nn.mlp_reference(x, *weights)),
             (parrun.bench._attention_heads, (q, k, v), (), parrun.bench._attention_tiles,
              nn.attention_reference(q[None], k[None], v[None])[0]),
             (parrun.bench._mandelbrot_rows, (np.arange(30),), (50, 30, 64, *M.VIEW),
              parrun.bench._mandelbrot_rows, M.mandelbrot_numpy(50, 30, 64))]
    held: list = []
    ran = set()
    try:
        for fn, inputs, consts, kernel, ref in cases:
            out = np.zeros_like(ref)
            for m in parrun.bench.split_peers(fn, inputs, consts, out, held, equal_shares=kernel):
                if m.make is None:  # joblib, mpire or Ray not installed
                    assert m.skipped == "not installed", m
                    continue
                out[:] = 0
                # Each returns its result (the equal static shares' is memory shared with
                # their processes, the others' is out)
                got = m.make(3)()
                assert m.ceiling or got is out, m.name
                np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=m.name)
                ran.add(m.name.split(",")[0])
    finally:
        parrun.bench._close_all(held)
        parrun.bench.ray_stop()
        if any(type(p).__name__ == "Parallel" for p in held):  # joblib's process-wide workers
            _stop_joblib()
    assert {"ThreadPoolExecutor", "multiprocessing.Pool", "ProcessPoolExecutor",
            "equal static shares"} <= ran
    assert ("mpire" in ran) == _installed("mpire") and ("ray" in ran) == _installed("ray")


@pytest.mark.timeout(120)
def test_ray_peers_run_beside_parrun_and_leave_nothing_behind():
    """Ray's methods in a full (not --quick) run: measured at each count, the runtime shut
    down with the run, and the bench's own signal handlers survive ``ray.init`` (which
    installs a C handler that would print a stack and skip the clean exit, in the bench and
    in every peer forked after it)."""
    ray = pytest.importorskip("ray")
    import psutil

    def handler(signum, frame):
        pass
    mine = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, handler)
    try:
        results = parrun.bench.run(["irregular"], [1, 2], 1, False, progress=False, warmup=0,
                                   irregular_items=40)
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, mine)
        _stop_joblib()  # the joblib peer's process-wide workers
    rows = results["workloads"]["irregular"]["methods"]["ray, a task per item"]
    assert set(rows["times_s"]) == {"1", "2"}, rows
    assert not ray.is_initialized()

    def ray_process(p: psutil.Process) -> bool:
        argv = cmdline(p)  # Ray's daemons and scripts live in its package; workers: ray::
        return any("/ray/" in a or a.startswith("ray::") for a in argv[:2])  # ([]: zombie)
    left = [p for p in psutil.Process().children(recursive=True) if ray_process(p)]
    assert not left, [(p.pid, p.ppid(), p.cmdline()) for p in left]


@pytest.mark.timeout(60)
def test_a_sigterm_while_ray_starts_goes_the_bench_s_way(monkeypatch):
    """``ray.init`` puts in its own SIGTERM handler (``sys.exit(15)``) as it begins, and the
    bench's handlers went back only once it returned: a SIGTERM in between ended the bench
    with exit code 15 instead of through its own handler (seen under load in
    ``test_a_signal_ends_a_run_with_ray_cleanly``). Now that signal reaches the bench's
    handler, and ``ray_stop`` kills the daemons the cut start had begun."""
    import types

    import psutil

    daemons: list[subprocess.Popen] = []

    def init(**kwargs):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as Ray does
        daemons.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises here
        raise AssertionError("no SIGTERM")

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(
        init=init, is_initialized=lambda: False, shutdown=lambda: None))

    class Cut(Exception):
        pass

    def handler(signum, frame):
        raise Cut

    mine = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Cut):
            parrun.bench._ray()
        assert signal.getsignal(signal.SIGTERM) is handler
        assert [p.pid for p in parrun.bench._RAY["daemons"]] == [daemons[0].pid]
        parrun.bench.ray_stop()  # kills it, and reaps it (so Popen.wait would say 0)
        assert not psutil.pid_exists(daemons[0].pid)
    finally:
        signal.signal(signal.SIGTERM, mine)
        parrun.bench._RAY.update(daemons=[], killed=False)
        for d in daemons:
            d.kill()
            d.wait()


@pytest.mark.timeout(60)
def test_a_failed_ray_start_leaves_no_daemons(monkeypatch):
    """``ray.init`` that fails after starting daemons: they are killed then (Ray is not up,
    so nothing would stop them). The bench calls it again for every worker count, and only
    the last start's daemons were kept for ``ray_stop``: the earlier ones ran on."""
    import types

    import psutil

    daemons: list[subprocess.Popen] = []

    def init(**kwargs):
        daemons.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        raise RuntimeError("the raylet did not start")

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(
        init=init, is_initialized=lambda: False, shutdown=lambda: None))
    try:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="the raylet did not start"):
                parrun.bench._ray()
            assert parrun.bench._RAY["daemons"] == []
        assert not any(psutil.pid_exists(d.pid) for d in daemons)
    finally:
        parrun.bench._RAY.update(daemons=[], killed=False)
        for d in daemons:
            d.kill()
            d.wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("to,sig,code", [("process", signal.SIGTERM, 143),
                                         ("group", signal.SIGTERM, 143),
                                         ("group", signal.SIGINT, 130)])
def test_a_signal_ends_a_run_with_ray_cleanly(tmp_path, to, sig, code):
    """A signal while Ray's tasks run ends the bench with the signal's exit code, Ray's
    processes gone. SIGTERM to the group (``timeout``) kills Ray's daemons too:
    ``ray.shutdown`` then waited for ever (the watchdog could not always run), and once that
    was avoided the interpreter's exit crashed in Ray's C++ side (SIGSEGV). Ctrl-C at a
    terminal (SIGINT to the group, which Ray's daemons ignore) prints one line."""
    pytest.importorskip("ray")
    import psutil

    out = tmp_path / "cut.json"
    p = subprocess.Popen([sys.executable, "-m", "parrun", "bench", "--workers", "1,2",
                          "--suite", "irregular", "--no-progress", "--warmup", "0",
                          "--repeat", "50", "--irregular-items", "300", "--json", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)

    def raylet() -> bool:
        return any("raylet" in " ".join(cmdline(c))
                   for c in psutil.Process(p.pid).children(recursive=True))
    try:
        t0 = time.monotonic()
        while not raylet():  # Ray started: its tasks are next
            assert p.poll() is None, p.stderr.read()[-3000:]
            assert time.monotonic() - t0 < 90, "Ray never started"
            time.sleep(0.1)
        time.sleep(3.0)
        children = psutil.Process(p.pid).children(recursive=True)
        err, took = _signal_and_wait(p, sig, group=to == "group")
    finally:
        take_down_if_hung(p)
    assert took < parrun.bench.EXIT_GRACE + 5
    # Ray's driver side may see its raylet die first and end the process itself (code 1):
    # seen in about 1 in 15 group SIGTERMs
    raylet_first = sig == signal.SIGTERM and to == "group" and p.returncode == 1
    assert p.returncode == code or raylet_first, err[-3000:]
    assert "still closing" not in err  # ended by the bench, not by its watchdog
    if sig == signal.SIGINT:  # (in the first workload: nothing written yet)
        assert err.strip().splitlines() == [
            f"bench: interrupted before a workload ended; {out} not written"], err[-3000:]
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [(c.pid, c.cmdline()[:2]) for c in alive]
    assert wait_until(lambda: not _running_with(str(out)), timeout=15), _running_with(str(out))
    assert wait_until(lambda: not list(Path("/dev/shm").glob(f"parrun_{p.pid}_*")),
                      timeout=10)  # (the resource tracker's, if Ray ended the process)


@pytest.mark.timeout(120)
def test_a_bench_killed_outright_leaves_no_peer_worker_and_no_segment(tmp_path):
    """SIGKILL (or Ray's signal handler) ends the bench at once: its peers' forked workers
    die with it. They once lived on, holding the resource tracker's pipe, so the tracker
    never unlinked the bench's segments."""
    import psutil

    cmd = [sys.executable, "-m", "parrun", "bench", "--workers", "1,2", "--suite", "irregular",
           "--no-progress", "--warmup", "0", "--repeat", "50", "--irregular-items", "300",
           "--skip", "ray,loky", "--json", str(tmp_path / "cut.json")]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)

    def forked() -> list:  # peers' workers: forks of the bench, with its command line
        me = psutil.Process(p.pid)
        return [c for c in me.children() if cmdline(c) == me.cmdline()]
    peers = []
    try:
        t0 = time.monotonic()
        while not forked():
            assert p.poll() is None and time.monotonic() - t0 < 90, "no peer ever forked"
            time.sleep(0.05)
        time.sleep(3.0)  # every peer has started (those forked later lived on)
        peers = forked()
        assert shm_segments(p.pid)  # parrun's pools are up too
        p.kill()
        p.wait(TIMEOUT)
        _, alive = psutil.wait_procs(peers, timeout=10)
        assert not alive, [c.pid for c in alive]
        assert wait_until(lambda: not shm_segments(p.pid), timeout=10), shm_segments(p.pid)
    finally:
        take_down_if_hung(p)
        for c in peers:  # on failure: not left for the next tests
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.mark.timeout(120)
def test_ray_tasks_run_at_most_workers_at_once():
    """The custom resource that stands for a worker count lets no more tasks run together,
    and Ray's workers run at the priority the other methods run at."""
    pytest.importorskip("ray")

    def span(seconds):
        assert os.nice(0) == 0  # not Ray's default nice 15: other peers' threads win then
        t = time.time()
        time.sleep(seconds)
        return t, time.time()

    parrun.bench.ray_config(4)
    try:
        ray = parrun.bench._ray()
        for w in (1, 2, 3):
            task = parrun.bench._ray_task(span, w)
            ray.get([task.remote(0.2) for _ in range(2 * w)])  # workers started
            spans = ray.get([task.remote(0.2) for _ in range(3 * w)])
            events = sorted([(t, 1) for t, _ in spans] + [(t, -1) for _, t in spans],
                            key=lambda e: (e[0], e[1]))  # an end before a start at a tie
            running = np.cumsum([d for _, d in events])
            assert running.max() == w, (w, spans)
    finally:
        parrun.bench.ray_stop()


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    results = {"workloads": {"toy": {"unit": "items/s", "work": 10, "note": "toy", "methods": {
        "serial": {"times_s": {"1": [1.0]}, "scales": False},
        "parrun x": {"times_s": {"1": [1.0, 1.1], "2": [0.55]}, "scales": True},
        "peer": {"skipped": "not installed"}}}}}
    path = tmp_path / "p.png"
    parrun.bench.plot(results, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = parrun.bench.format_table("toy", results["workloads"]["toy"])
    assert "skipped: not installed" in table
    assert "1.91x" in table and "0.91" in table  # 1.05 / 0.55; serial / (2 x 0.55)


def test_skip_leaves_peers_out_and_says_so():
    results = parrun.bench.run(["tasks"], [1], 1, True, progress=False, warmup=0,
                               skip=["loky", "mpire"])
    methods = results["workloads"]["tasks"]["methods"]
    for name, pkg in (("loky", "loky"), ("mpire apply_async", "mpire")):  # installed or not
        assert methods[name] == {"skipped": "left out by --skip" if _installed(pkg)
                                 else "not installed"}
    assert "times_s" in methods["ProcessPoolExecutor"]
    assert results["config"]["skip"] == ["loky", "mpire"]
    with pytest.raises(ValueError, match="cannot skip parrun"):
        parrun.bench.run(["tasks"], [1], 1, True, progress=False, skip=["parrun"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown suite"):
        parrun.bench.run(["nope"], [1], 1, True, progress=False)
    with pytest.raises(ValueError, match="positive"):
        parrun.bench.run(["map"], [0], 1, True, progress=False)


@pytest.mark.parametrize("args,says", [
    (["--workers", ""], "without empty entries"),
    (["--workers", "1,"], "without empty entries"),
    (["--workers", "2,x"], "whole numbers"),
    (["--workers", "0"], "at least 1"),
    (["--workers", "2,2"], "lists 2 more than once"),
    (["--suite", "nosuch"], "unknown suite nosuch"),
    (["--suite", "map,map"], "lists map more than once"),
    (["--skip", "rayy"], "--skip: unknown peer rayy"),
    (["--skip", "parrun"], "--skip: unknown peer parrun"),
    (["--irregular-items", "0"], "--irregular-items must be >= 1"),
    (["--json", "/nonexistent/r.json"], "not a file in a writable folder"),
    (["--plot", "/nonexistent/r.png"], "not a file in a writable folder"),
    (["--json", "/proc/r.json"], "not a file in a writable folder"),  # a folder, not ours
    (["--plot", "r.txt"], "PLOT_FORMAT"),
    (["--plot", "r"], "PLOT_NO_EXTENSION"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--workers", "1,100000"], "measures only oversubscription"),
    (["--from-json", "/nonexistent/r.json"], "No such file"),
    (["--from-json", "TRUNCATED"], "Expecting"),
    (["--from-json", "OTHER"], "not a `python -m parrun bench --json` file"),
])
def test_bad_command_lines_fail_at_once_in_one_line(tmp_path, args, says):
    (tmp_path / "TRUNCATED").write_text('{"workloads": {"map": ')
    (tmp_path / "OTHER").write_text('{"format": "something-else/3", "workloads": {}}')
    args = [str(tmp_path / a) if a in ("TRUNCATED", "OTHER") else a for a in args]
    if says.startswith("PLOT_"):  # matplotlib is a bench extra, not a test one
        try:
            import matplotlib  # noqa: F401
            says = ("matplotlib cannot write .txt" if says == "PLOT_FORMAT"
                    else "name the format with an extension")
        except ImportError:
            says = "--plot needs matplotlib"
    r = subprocess.run([sys.executable, "-m", "parrun", "bench", "--quick", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_repeat_and_warmup_given_with_quick_are_kept(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "parrun", "bench", "--quick", "--suite", "tasks",
                        "--workers", "1", "--repeat", "3", "--warmup", "0", "--no-progress",
                        "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert (data["config"]["repeat"], data["config"]["warmup"]) == (3, 0)
    assert len(data["workloads"]["tasks"]["methods"]["parrun Pool.submit"]["times_s"]["1"]) == 3
    r = subprocess.run([sys.executable, "-m", "parrun", "bench", "--repeat", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--repeat must be >= 1, got 0" in r.stderr
    r = subprocess.run([sys.executable, "-m", "parrun", "bench", "--quick", "--warmup", "-1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--warmup must be >= 0, got -1" in r.stderr


def test_runs_are_interleaved_so_methods_are_timed_side_by_side():
    log: list[tuple[str, int]] = []

    def method(name, scales=True, exclusive=False):
        return parrun.bench.Method(name, lambda w: (lambda: log.append((name, w))),
                                   scales=scales, exclusive=exclusive)
    wl = parrun.bench.Workload("toy", "items/s", 1, [
        method("serial", scales=False), method("a"), method("one pool", exclusive=True),
        method("b"), parrun.bench.Method("c", None, skipped="not installed")])
    rows = parrun.bench._measure(wl, [1, 2], repeat=3, warmup=1)
    assert rows["c"] == {"skipped": "not installed"}
    assert set(rows["a"]["times_s"]) == {"1", "2"} and set(rows["serial"]["times_s"]) == {"1"}
    assert all(len(ts) == 3 for m in ("serial", "a", "b") for ts in rows[m]["times_s"].values())
    calls = [("serial", 1), ("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert log[:5] == calls  # one warm-up each
    rounds = [log[5 + 5 * r:10 + 5 * r] for r in range(3)]
    assert all(sorted(r) == sorted(calls) for r in rounds)  # every round runs each once
    assert [r[0] for r in rounds] == [("serial", 1), ("a", 1), ("a", 2)]  # each starts further on
    # a method whose counts share one pool runs last, one count at a time (1 warm-up each)
    assert log[20:] == [("one pool", 1)] * 4 + [("one pool", 2)] * 4
    assert list(rows) == ["serial", "a", "one pool", "b", "c"]  # the table keeps its order


def test_the_progress_bar_ticks_at_every_timed_run():
    class Bar:
        def __init__(self, name, total):
            self.name, self.total, self.n, self.closed = name, total, 0, False
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True
    bars: list = []
    M = parrun.bench.Method
    wl = parrun.bench.Workload("toy", "items/s", 1, [
        M("serial", lambda w: (lambda: None), scales=False), M("a", lambda w: (lambda: None)),
        M("one pool", lambda w: (lambda: None), exclusive=True)])
    parrun.bench._measure(wl, [1, 2], repeat=3, warmup=1, progress=Bar)
    (bar,) = bars
    assert (bar.name, bar.total, bar.n, bar.closed) == ("toy", 15, 15, True)


def test_a_method_that_raises_is_reported_and_the_others_go_on():
    log: list[tuple[str, int]] = []
    runs = {"late": 0}

    def ok(name):
        return parrun.bench.Method(name, lambda w: (lambda: log.append((name, w))))

    def bad_make(w):
        raise ImportError("no such peer")

    def late(w):
        def run():
            runs["late"] += 1
            if runs["late"] > 3:  # its warm-ups pass, a timed run fails
                raise RuntimeError("broke mid-run")
        return run

    def bad_exclusive(w):
        if w == 2:
            raise OSError("no room")
        return lambda: None

    M = parrun.bench.Method
    wl = parrun.bench.Workload("toy", "items/s", 1, [
        ok("a"), M("make fails", bad_make), M("run fails", late), ok("b"),
        M("exclusive fails", bad_exclusive, exclusive=True)])
    rows = parrun.bench._measure(wl, [1, 2], repeat=3, warmup=1)
    assert rows["make fails"] == {"skipped": "failed: ImportError: no such peer"}
    assert rows["run fails"] == {"skipped": "failed: RuntimeError: broke mid-run"}
    assert rows["exclusive fails"] == {"skipped": "failed: OSError: no room"}
    for name in ("a", "b"):
        assert all(len(ts) == 3 for ts in rows[name]["times_s"].values())
    results = {"workloads": {"toy": {"unit": "items/s", "work": 1, "note": "", "methods": rows},
                             "gone": {"error": "failed: MemoryError: /dev/shm is full"}}}
    assert parrun.bench.failures(results) == [
        "toy: make fails: failed: ImportError: no such peer",
        "toy: run fails: failed: RuntimeError: broke mid-run",
        "toy: exclusive fails: failed: OSError: no room",
        "gone: failed: MemoryError: /dev/shm is full"]
    table = parrun.bench.format_table("toy", results["workloads"]["toy"])
    assert "run fails" in table and "broke mid-run" in table and "a  " in table
    assert "failed: MemoryError" in parrun.bench.format_table("gone", results["workloads"]["gone"])


def test_a_wrong_answer_is_reported_as_failed_and_never_timed():
    """Each (method, workers) is checked on its first untimed run, against what the
    workload says is right; output buffers are cleared first, so a method that writes nothing
    fails even where the method before it wrote the right answer."""
    buf = np.zeros(4)
    runs: list[str] = []

    def writes(value, name):
        def make(w):
            def run():
                runs.append(name)
                buf[:] = value if w == 1 or name != "wrong at 2" else -1
                return buf
            return run
        return make

    def nothing(w):
        def run():
            runs.append("writes nothing")
            return buf
        return run
    M = parrun.bench.Method
    wl = parrun.bench.Workload(
        "toy", "items/s", 1,
        [M("right", writes(7, "right")), M("writes nothing", nothing),
         M("wrong at 2", writes(7, "wrong at 2")), M("wrong, one pool", writes(3, "excl"),
                                                     exclusive=True),
         M("copy", writes(0, "copy"), same_work=False)],
        check=lambda ret: None if (np.asarray(ret) == 7).all() else f"got {ret[0]:g}",
        reset=lambda: buf.fill(np.nan))
    rows = parrun.bench._measure(wl, [1, 2], repeat=2, warmup=0)
    assert all(len(ts) == 2 for ts in rows["right"]["times_s"].values())
    assert rows["writes nothing"] == {"skipped": "failed: WrongResult: wrong result: got nan"}
    assert rows["wrong at 2"] == {"skipped": "failed: WrongResult: wrong result: got -1"}
    assert rows["wrong, one pool"] == {"skipped": "failed: WrongResult: wrong result: got 3"}
    assert set(rows["copy"]["times_s"]) == {"1", "2"}  # not the work: not checked
    assert runs.count("writes nothing") == 1 and runs.count("excl") == 1  # never timed
    assert runs.count("wrong at 2") == 2  # checked at 1 worker and at 2, timed at neither
    results = {"workloads": {"toy": {"unit": "items/s", "work": 1, "note": "",
                                     "methods": rows}}}
    assert "toy: writes nothing: failed: WrongResult: wrong result: got nan" in \
        parrun.bench.failures(results)


@pytest.mark.timeout(120)
def test_each_workload_s_check_passes_its_reference_and_fails_a_wrong_answer():
    """The real workloads' checks: the reference passes, a changed answer (one element, one
    task, one item, one in 100 pixels) fails."""
    B = parrun.bench
    with parrun.Pool(1) as pool:
        for name in ("map", "tasks", "irregular", "mlp", "attention", "mandelbrot"):
            wl = B._build(name, True, {1: pool})
            try:
                assert wl.check is not None, name
                serial = wl.methods[0] if name == "irregular" else \
                    next(m for m in wl.methods if m.name.startswith("parrun"))
                if wl.reset:
                    wl.reset()
                right = serial.make(1)()
                assert wl.check(right) is None, name
                if name == "tasks":
                    wrong = [f.result() for f in right]
                    wrong[5] = None
                elif name == "irregular":
                    wrong = list(right)
                    wrong[-1] += 1
                else:
                    wrong = np.array(right)
                    flat = wrong.reshape(-1)
                    if name == "mandelbrot":
                        wrong[-1] = -1  # one row left unwritten
                    else:
                        flat[len(flat) // 2] += 0.1
                problem = wl.check(wrong)
                assert problem, name
                assert wl.check(np.asarray(wrong)[:3] if name != "tasks" else wrong[:3]), name
            finally:
                for c in wl.cleanup:
                    c()
    assert B._check_items(B.Unordered([[B.cost_of(2), B.cost_of(0)], [B.cost_of(1)]]), 3) is None
    assert B._check_items([B.cost_of(1), B.cost_of(0), B.cost_of(2)], 3)  # misplaced
    assert B._check_items([B.cost_of(i) for i in range(3)], 3) is None
    assert [B.cost_of(i) for i in range(60)] == [B._cost(i) for i in range(60)]


def test_the_table_names_the_best_peer_at_each_count():
    methods = {"serial s": {"times_s": {"1": [1.0]}, "scales": False},
               "parrun x": {"times_s": {"1": [1.25], "2": [0.5]}, "scales": True},
               "threads": {"times_s": {"1": [2.0], "2": [0.8]}, "scales": True}}
    table = parrun.bench.format_table("toy", {"unit": "items/s", "work": 1, "note": "",
                                              "methods": methods})
    assert table.splitlines()[-1] == "best peer, by workers: 1 serial s; 2 threads", table


def test_a_workload_that_cannot_be_set_up_is_reported(monkeypatch, tmp_path):
    def no_room(*args):
        raise MemoryError("/dev/shm is full")

    monkeypatch.setattr(parrun.bench, "map_workload", no_room)
    results = parrun.bench.run(["map", "mandelbrot"], [1], 1, True, progress=False, warmup=0,
                               json_path=str(tmp_path / "r.json"))
    assert results["workloads"]["map"] == {"error": "failed: MemoryError: /dev/shm is full"}
    assert "times_s" in results["workloads"]["mandelbrot"]["methods"]["parrun nn.mandelbrot"]
    assert json.loads((tmp_path / "r.json").read_text())["workloads"]["map"]["error"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("to,second", [("process", "irregular"), ("group", "irregular"),
                                       ("group", "map"), ("group-ctrl-c", "map")])
def test_sigterm_ends_a_run_cleanly(tmp_path, to, second):
    """A long bench cut by SIGTERM: pools close, segments go, JSON is kept. Sent to the whole
    process group (as ``timeout`` does) it also kills the peers' pool workers; in the map
    workload that once hung the exit for ever (a ProcessPoolExecutor's feeder thread writing
    to killed workers). Ctrl-C at a terminal (SIGINT to the group) prints one line."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "cut.json"
    # map at full size (64M elements: 4 MiB blocks to the ProcessPoolExecutor), after a
    # short first workload
    first = {"irregular": "mandelbrot", "map": "irregular"}
    items = {"irregular": "4000", "map": "100"}
    # (Ray, when installed, has its own test below: a signal to the group kills its daemons)
    p = subprocess.Popen([sys.executable, "-m", "parrun", "bench", "--workers", "1,2",
                          "--suite", f"{first[second]},{second}", "--no-progress",
                          *(["--quick"] if second == "irregular" else ["--warmup", "0",
                                                                       "--skip", "ray"]),
                          "--irregular-items", items[second], "--json", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        t0 = time.monotonic()
        while not out.exists():  # the first workload done: now in the second
            assert p.poll() is None, p.stderr.read()[-3000:]
            assert time.monotonic() - t0 < 90, "the first workload never finished"
            time.sleep(0.1)
        time.sleep(1.0 if second == "irregular" else 4.0)  # map: into its timed runs
        children = psutil.Process(p.pid).children(recursive=True)
        assert children  # parrun's workers and the peers' pools are running
        err, took = _signal_and_wait(p, signal.SIGINT if to == "group-ctrl-c"
                                     else signal.SIGTERM, group=to != "process")
    finally:
        take_down_if_hung(p)
    assert took < parrun.bench.EXIT_GRACE + 5
    if to == "group-ctrl-c":
        assert p.returncode == 130 and err.strip().splitlines() == [
            f"bench: interrupted; the workloads done so far are in {out}"], err[-3000:]
    else:
        assert p.returncode == 128 + 15, err[-3000:]
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [c.pid for c in alive]
    # nor any forked after the signal (a pool's replacements for the workers it killed)
    assert wait_until(lambda: not _running_with(str(out)), timeout=15), _running_with(str(out))
    assert not list(Path("/dev/shm").glob(f"parrun_{p.pid}_*"))
    assert first[second] in json.loads(out.read_text())["workloads"]


@pytest.mark.timeout(120)
def test_ctrl_c_before_the_first_workload_ends_says_nothing_was_written(tmp_path):
    """It said "the workloads done so far are in cut.json" of a file it never wrote (or of
    an earlier run's, left as it was)."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "cut.json"
    out.write_text('{"an": "earlier run"}')
    p = subprocess.Popen([sys.executable, "-m", "parrun", "bench", "--workers", "1,2",
                          "--suite", "irregular", "--no-progress", "--warmup", "0",
                          "--repeat", "50", "--irregular-items", "300", "--skip", "ray",
                          "--json", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        t0 = time.monotonic()
        while len(psutil.Process(p.pid).children(recursive=True)) < 3:  # measuring
            assert p.poll() is None, p.stderr.read()[-3000:]
            assert time.monotonic() - t0 < 60, "the bench never started its pools"
            time.sleep(0.1)
        time.sleep(1.0)
        err, _took = _signal_and_wait(p, signal.SIGINT, group=True)
    finally:
        take_down_if_hung(p)
    # 130, or dead by SIGINT after saying so (a shell reports both as 130): 1 run in 10 in
    # some sessions, a second SIGINT reached it after Python had put SIGINT back to its
    # default at exit. The run now ignores SIGINT once closed (see the test below); the
    # second SIGINT's sender was never found, so -2 is still accepted here.
    assert p.returncode in (130, -signal.SIGINT), err[-3000:]
    assert err.strip().splitlines() == [
        f"bench: interrupted before a workload ended; {out} not written"], err[-3000:]
    assert out.read_text() == '{"an": "earlier run"}'


def test_a_count_past_the_cpus_this_process_may_use_is_refused():
    """The check counted the machine's CPUs, not those of the process (taskset, cgroups)."""
    most = parrun.bench.MAX_WORKERS_PER_CPU
    r = subprocess.run([sys.executable, "-m", "parrun", "bench", "--quick", "--suite", "tasks",
                        "--workers", str(most + 1), "--no-progress"], capture_output=True,
                       text=True, timeout=60, preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    assert r.returncode == 2 and "measures only oversubscription" in r.stderr, r.stderr[-3000:]


def _interrupted_after(setup: str, body: str) -> subprocess.CompletedProcess:
    """Run ``setup``, then ``body`` (which sends the process SIGINT somewhere awkward) with
    the bench's signal handling on; stdout says whether the run was interrupted."""
    script = (f"import os, signal, time\nimport parrun.bench as B\nB._on_signals()\n"
              f"{setup}\ntry:\n{textwrap.indent(body, '    ')}\n    time.sleep(3)\n"
              "    print('not interrupted', flush=True)\nexcept KeyboardInterrupt:\n"
              "    print('interrupted', flush=True)\nos._exit(0)\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.timeout(60)
def test_ctrl_c_in_a_fork_hook_still_ends_the_run():
    """The handler's exception, raised where Python ignores exceptions, was printed as
    "Exception ignored" and the run went on until the watchdog killed it 10 s later (seen
    once in the suite: a signal during a fork, in logging's at-fork hook)."""
    r = _interrupted_after(
        "def hook():  # Ctrl-C in an at-fork hook (logging's has one), where Python ignores\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # exceptions: the handler's too\n"
        "    time.sleep(0.05)\n"
        "os.register_at_fork(after_in_parent=hook)",
        "pid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)")
    assert r.stdout.strip() == "interrupted", (r.stdout, r.stderr[-3000:])
    assert "Exception ignored" not in r.stderr, r.stderr[-3000:]


LATE_CTRL_C = """
import os, signal, sys, time
import parrun.bench as B


def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)


B.run = interrupted
B.rerun_without_openblas_vars = lambda argv: None  # (it would exec a real bench)
rc = B.main(["--suite", "tasks", "--workers", "1", "--no-progress"])
# Python keeps SIGINT ignored through its exit; its own handler or the bench's it puts back
# to the default there, and a late Ctrl-C then kills the run
print("exits with", rc, "SIGINT ignored:", signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
      flush=True)
os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C as the run exits
time.sleep(0.2)
sys.exit(rc)
"""


@pytest.mark.timeout(60)
def test_a_late_ctrl_c_as_the_interrupted_bench_exits_is_ignored():
    """After the interrupted run has closed everything, Python's exit put SIGINT back to its
    default: a late second Ctrl-C killed the run (rc -2) after its message."""
    r = subprocess.run([sys.executable, "-c", LATE_CTRL_C], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 130 and r.stdout.strip() == "exits with 130 SIGINT ignored: True", \
        (r.returncode, r.stdout, r.stderr[-3000:])
    assert r.stderr.strip().splitlines() == ["bench: interrupted"], r.stderr[-3000:]


@pytest.mark.timeout(60)
def test_ctrl_c_while_mpire_starts_a_worker_still_ends_the_run():
    """mpire set SIGINT to SIG_IGN while it forked a worker: a Ctrl-C then was dropped, and
    the bench ran to its end (1 run in ~12 of the Ctrl-C test above: 47 s, exit 0)."""
    pytest.importorskip("mpire")
    r = _interrupted_after(
        "import mpire.pool\n"
        "B._mpire_pool(1).terminate()  # (the bench's mpire pools: workers start later)",
        "with mpire.pool.DisableKeyboardInterruptSignal():  # as mpire forks each worker\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(0.05)")
    assert r.stdout.strip() == "interrupted", (r.stdout, r.stderr[-3000:])


REPLACED_WORKER = """
import multiprocessing as mp, os, signal, sys, time
import parrun.bench as B
B._on_signals()  # as the bench does: its peers' forked workers die with it
p = mp.get_context("fork").Pool(1)
first = p._pool[0].pid
os.kill(first, signal.SIGKILL)  # the pool's own thread forks a replacement
while p._pool[0].pid == first or not p._pool[0].is_alive():
    time.sleep(0.01)
open(sys.argv[1], "w").write(str(p._pool[0].pid))
os._exit(0)  # the bench ended outright
"""


@pytest.mark.timeout(60)
def test_a_pool_worker_forked_by_the_pool_s_thread_dies_with_the_bench(tmp_path):
    """A signal to the process group kills the peers' pool workers; multiprocessing.Pool's
    own thread forks replacements, which (unlike those forked by the main thread) were not
    tied to the bench: 12 of them outlived two benches for good, waiting on the pool's
    queue."""
    import psutil

    said, err = tmp_path / "pid", tmp_path / "err"
    with open(err, "w") as f:  # not pipes: a worker left alive would hold them open
        r = subprocess.run([sys.executable, "-c", REPLACED_WORKER, str(said)],
                           stdout=subprocess.DEVNULL, stderr=f, timeout=30)
    assert r.returncode == 0, err.read_text()[-3000:]
    pid = int(said.read_text())

    def ended() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    gone = wait_until(ended, timeout=10)
    if not gone:
        os.kill(pid, signal.SIGKILL)
    assert gone, f"the replacement worker {pid} outlived the bench"


def _running_with(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (a run's own --json path)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or ()):
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


KILLED_POOL = """
import multiprocessing as mp, os, signal, time
import parrun.bench as B
B.PEER_CLOSE_TIMEOUT = 1.0
p = mp.get_context("fork").Pool(2)
p.map(abs, range(10))
time.sleep(0.3)
for w in p._pool:  # idle workers: one of them holds the pool's task-queue lock
    os.kill(w.pid, signal.SIGKILL)
time.sleep(0.5)
t = time.monotonic()
B._close_all([p])
for w in p._pool:
    w.join(5)
print(round(time.monotonic() - t, 2), [w.exitcode for w in p._pool], flush=True)
"""


@pytest.mark.timeout(60)
def test_a_peer_pool_whose_workers_were_killed_still_closes():
    """What a SIGTERM to the process group does to ``multiprocessing.Pool``: its
    ``terminate()`` then waits for ever on the lock the killed worker held. The bench's
    cleanup gives it ``PEER_CLOSE_TIMEOUT`` and kills what is left."""
    p = subprocess.Popen([sys.executable, "-c", KILLED_POOL], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=30)
    finally:
        take_down_if_hung(p)  # with its pool's workers
    assert p.returncode == 0, err[-3000:]
    took, codes = out.split(" ", 1)
    assert float(took) < 10
    assert codes.strip() != "[]" and "None" not in codes  # every worker it had is dead


STUCK_EXECUTOR = """
import concurrent.futures as cf, multiprocessing as mp, os, signal, sys, time
import numpy as np
import parrun.bench as B
B.PEER_CLOSE_TIMEOUT, B.EXIT_GRACE = 1.0, 3.0

def twice(a):
    return a * 2

if __name__ == "__main__":
    B._on_signals()
    ex = cf.ProcessPoolExecutor(2, mp_context=mp.get_context("fork"))
    try:
        futs = [ex.submit(twice, np.ones(1 << 20)) for _ in range(200)]  # 8 MiB each way
        time.sleep(float(sys.argv[1]))
        for p in list(ex._processes.values()):  # as a SIGTERM to the group would
            os.kill(p.pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    finally:
        B._close_all([ex])
"""


@pytest.mark.timeout(120)
def test_a_signal_ends_the_bench_even_when_a_peer_cannot_stop():
    """Workers killed in the middle of sending a result can leave a ProcessPoolExecutor's
    threads blocked for ever, and the interpreter waits for them at exit (it happened to a
    bench cut by ``timeout``): ``EXIT_GRACE`` after the signal, everything is killed."""
    for delay in ("0.3", "0.5", "0.7", "0.9"):
        p = subprocess.Popen([sys.executable, "-c", STUCK_EXECUTOR, delay],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        try:
            _, err = p.communicate(timeout=15)
        finally:
            take_down_if_hung(p)
        assert p.returncode == 128 + 15, err[-3000:]



SIGNAL_TO_ANOTHER_THREAD = """
import multiprocessing as mp, signal, sys, threading, time
import parrun.bench as B

if __name__ == "__main__":
    B._on_signals()
    pool = mp.get_context("fork").Pool(2)  # its terminate() sends each worker SIGTERM:
    pool.map(abs, range(4))                # theirs, not the bench's
    pool.terminate()
    pool.join()
    time.sleep(0.5)
    print("pool closed, still running", flush=True)
    other = threading.Thread(target=time.sleep, args=(30,), daemon=True)
    other.start()
    # a signal to the process that the kernel hands to another thread than the main one
    threading.Timer(0.3, signal.pthread_kill, (other.ident, signal.SIGTERM)).start()
    t = time.monotonic()
    try:
        threading.Event().wait()  # as Pool.map waits for a result that never comes
    finally:
        print(f"closing after {time.monotonic() - t:.2f} s", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_signal_that_lands_in_another_thread_still_ends_the_run():
    """Python runs signal handlers only in the main thread, and the kernel may hand a signal
    to any thread: the main thread, waiting on a lock, then waited for ever (a bench cut by
    a SIGTERM to its process group, in ``Pool.map``). The bench sends the signal on to the
    main thread, which closes at once; its peers' workers' signals stay their own."""
    p = subprocess.Popen([sys.executable, "-c", SIGNAL_TO_ANOTHER_THREAD],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=parrun.bench.EXIT_GRACE + 20)
    finally:
        take_down_if_hung(p)
    assert p.returncode == 128 + 15, err[-3000:]
    lines = out.splitlines()
    assert lines[0] == "pool closed, still running", out
    assert lines[1].startswith("closing after ")
    assert 0.3 <= float(lines[1].split()[2]) < 0.3 + 1.0, out  # not the watchdog's EXIT_GRACE


def _info(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "parrun", "info"], capture_output=True,
                          text=True, timeout=60, env=env)


def test_info_describes_this_machine_and_the_defaults():
    psutil = pytest.importorskip("psutil")
    r = _info({})
    assert r.returncode == 0, r.stderr
    got = dict(line.strip().split(": ", 1) for line in r.stdout.splitlines())
    assert int(got["logical_cores"]) == psutil.cpu_count(logical=True)
    assert int(got["physical_cores"]) == psutil.cpu_count(logical=False)
    assert int(got["usable_cores"]) == len(os.sched_getaffinity(0))
    assert int(got["default_workers"]) == parrun.default_workers()
    assert got["blas_threads_per_worker"] == "1" and got["parrun"] == parrun.__version__
    assert got["numpy"] == np.__version__ and got["start_method"] in ("forkserver", "spawn")
    assert "num_threads" in got["blas"]
    assert abs(float(got["memory_gib"]) - psutil.virtual_memory().total / 2**30) < 0.1
    r = _info({"PARRUN_NUM_WORKERS": "3"})
    assert "default_workers: 3" in r.stdout
    r = _info({"PARRUN_NUM_WORKERS": "abc"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "PARRUN_NUM_WORKERS must be a positive integer, got 'abc'" in r.stderr


OK_WORKLOAD = {"unit": "items/s", "work": 1, "note": "", "methods": {
    "serial": {"times_s": {"1": [1.0]}, "scales": False},
    "peer": {"skipped": "not installed"}}}


@pytest.mark.parametrize("workloads,says", [
    ({"map": {}}, "workload 'map': neither an error nor a unit"),
    ({"map": 5}, "workload 'map' is not an object"),
    ({"map": {**OK_WORKLOAD, "work": "1"}}, "its work is not a number"),
    ({"map": {**OK_WORKLOAD, "methods": {"a": {"times_s": {"1": []}, "scales": True}}}},
     "method 'a': times at 1 workers are not a non-empty list of positive seconds"),
    ({"map": {**OK_WORKLOAD, "methods": {"a": {"times_s": {"1": [1.0]}}}}},
     "method 'a': scales is not true or false"),
    ({"map": {**OK_WORKLOAD, "methods": {"a": {"times_s": {"x": [1.0]}, "scales": True}}}},
     "'x' is not a worker count"),
    ({"map": {**OK_WORKLOAD, "methods": {"a": {"times_s": {"1": [0]}, "scales": True}}}},
     "positive seconds"),
    ({"map": {**OK_WORKLOAD, "methods": {"a": {"times_s": {"2": [1.0]}, "scales": False}}}},
     "a serial method without its 1-worker times"),
    ({"map": {**OK_WORKLOAD, "methods": {"a": {}}}}, "neither times_s nor skipped"),
    ({"ok": OK_WORKLOAD, "map": {"error": 3}}, "workload 'map': its error is not a string"),
])
def test_from_json_of_another_shape_is_a_one_line_error(tmp_path, capsys, workloads, says):
    """A JSON file that is not what ``--json`` writes (another tool's, a hand-made one) is
    argparse's one-line error (exit 2), not a traceback from the table code."""
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"workloads": workloads}))
    with pytest.raises(SystemExit) as e:
        parrun.bench.main(["--from-json", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err.splitlines()[-1], err
    path.write_text(json.dumps({"workloads": {"ok": OK_WORKLOAD, "gone": {"error": "x"}}}))
    assert parrun.bench.main(["--from-json", str(path)]) == 0  # what --json writes reads


def _no_run(monkeypatch) -> None:
    """main() in this process: no re-exec, no signal handlers of its own."""
    for v in parrun.bench._OPENBLAS_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(parrun.bench, "_on_signals", lambda: None)


def test_a_plot_of_nothing_measured_says_so(tmp_path, capsys, monkeypatch):
    """Every workload failed: ``--from-json ... --plot`` is a one-line error, and a run says
    it wrote no plot (its failures listed, exit 1), not ``plot()``'s traceback."""
    pytest.importorskip("matplotlib")
    path, png = tmp_path / "failed.json", tmp_path / "p.png"
    path.write_text(json.dumps({"workloads": {"map": {"error": "failed: RuntimeError: x"}}}))
    with pytest.raises(SystemExit) as e:
        parrun.bench.main(["--from-json", str(path), "--plot", str(png)])
    assert e.value.code == 2 and "nothing to plot" in capsys.readouterr().err

    def no_room(*args):
        raise MemoryError("/dev/shm is full")
    _no_run(monkeypatch)
    monkeypatch.setattr(parrun.bench, "map_workload", no_room)
    code = parrun.bench.main(["--quick", "--suite", "map", "--workers", "1", "--no-progress",
                              "--plot", str(png)])
    err = capsys.readouterr().err
    assert code == 1 and f"no workload was measured: {png} not written" in err, err
    assert "map: failed: MemoryError: /dev/shm is full" in err and not png.exists()


@pytest.mark.parametrize("workers,says", [
    ("1,01", "--workers lists 1 more than once"),
    ("10,1_0", "whole numbers (decimal digits)"),
    ("1,+1", "whole numbers (decimal digits)"),
    ("1,\u0662", "whole numbers (decimal digits)"),  # an Arabic-Indic 2: int() takes it
])
def test_worker_counts_are_compared_as_numbers(monkeypatch, capsys, workers, says):
    _no_run(monkeypatch)

    def ran(*args, **kwargs):
        raise AssertionError(f"--workers {workers!r} was taken")
    monkeypatch.setattr(parrun.bench, "run", ran)
    with pytest.raises(SystemExit) as e:
        parrun.bench.main(["--quick", "--suite", "tasks", "--workers", workers])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err.splitlines()[-1], err


@pytest.mark.parametrize("args", [["--workers", "1"], []])
def test_a_bad_parrun_num_workers_is_a_one_line_error(args):
    """As ``python -m parrun info`` reports it, whether or not --workers is given."""
    r = subprocess.run([sys.executable, "-m", "parrun", "bench", "--quick", "--suite", "tasks",
                        "--no-progress", *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PARRUN_NUM_WORKERS": "abc"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1].endswith(
        "PARRUN_NUM_WORKERS must be a positive integer, got 'abc'"), r.stderr


def test_joblib_at_one_worker_is_in_process_and_not_a_peer():
    """joblib runs ``n_jobs=1`` in the calling process: its 1-worker rows are the bench's own
    process, marked so, and never parrun's "best peer"."""
    joblib = pytest.importorskip("joblib")
    with joblib.Parallel(n_jobs=1) as par:  # why: no worker process at one job
        assert set(par(joblib.delayed(os.getpid)() for _ in range(4))) == {os.getpid()}
    held: list = []
    peers = parrun.bench.split_peers(np.negative, (np.ones(4),), (), np.ones(4), held)
    (jl,) = [m for m in peers if m.name.startswith("joblib")]
    assert jl.in_process == (1,) == parrun.bench.JOBLIB_IN_PROCESS
    wl = parrun.bench.Workload("toy", "items/s", 1, [
        parrun.bench.Method("parrun x", lambda w: (lambda: None)),
        parrun.bench.Method("joblib y", lambda w: (lambda: None), in_process=(1,))])
    rows = parrun.bench._measure(wl, [1], repeat=1, warmup=0)
    assert rows["joblib y"]["in_process"] == [1] and "in_process" not in rows["parrun x"]
    methods = {"parrun x": {"times_s": {"1": [1.0], "2": [0.5]}, "scales": True},
               "joblib y": {"times_s": {"1": [0.25], "2": [0.4]}, "scales": True,
                            "in_process": [1]},
               "threads": {"times_s": {"1": [2.0], "2": [1.0]}, "scales": True}}
    for m in (methods, {**methods, "joblib y": {k: v for k, v in methods["joblib y"].items()
                                                if k != "in_process"}}):  # an older file
        table = parrun.bench.format_table("toy", {"unit": "items/s", "work": 1, "note": "",
                                                  "methods": m}).splitlines()
        parrun_1, parrun_2 = (line for line in table if line.startswith("parrun x"))
        assert parrun_1.endswith("2.00x"), table  # threads' 2.0 s, not joblib's 0.25 s
        assert parrun_2.endswith("0.80x"), table  # at 2 workers joblib is a process peer
        assert any(line.startswith("joblib y (in-process)   ") for line in table), table
        assert sum("(in-process)" in line for line in table) == 1


@pytest.mark.timeout(120)
def test_mandelbrot_without_numba_runs_every_peer_on_the_python_kernel(monkeypatch):
    """Without numba, ``nn.mandelbrot`` runs the plain-Python kernel: the hand-split peers run
    it too (they were dropped from the table), and the numba row says it is skipped."""
    from parrun.nn import _mandelbrot as M

    monkeypatch.setitem(sys.modules, "numba", None)  # "import numba" raises ImportError
    monkeypatch.setattr(M, "HAVE_NUMBA", False)
    monkeypatch.setattr(M, "escape_rows", None)
    monkeypatch.setattr(M, "escape_prange", None)
    monkeypatch.setattr(parrun.bench, "MANDELBROT_SIZES", {True: (24, 16)})
    rows = parrun.bench._mandelbrot_rows(np.arange(20), 24, 20, 16, *M.VIEW, False)
    np.testing.assert_array_equal(rows, M.mandelbrot_numpy(24, 20, 16))
    try:
        results = parrun.bench.run(["mandelbrot"], [1, 2], 1, True, progress=False, warmup=0)
    finally:
        _stop_joblib()
    wl = results["workloads"]["mandelbrot"]
    assert "plain-Python kernel" in wl["note"]
    methods = wl["methods"]
    assert methods["numba parallel=True"] == {"skipped": "numba not installed"}
    for peer in ("ThreadPoolExecutor, 4 blocks a thread", "multiprocessing.Pool, pickled blocks",
                 "joblib, memmapped blocks", "mpire, inherited blocks",
                 "ray, object store blocks", "parrun nn.mandelbrot"):
        m = methods[peer]
        if peer.startswith("ray"):
            assert m["skipped"].startswith("left out of --quick" if _installed("ray")
                                           else "not installed"), m
        elif "times_s" not in m:
            assert m == {"skipped": "not installed"} and not _installed(peer.split(",")[0])
        else:
            assert set(m["times_s"]) == {"1", "2"}, (peer, m)


def test_numexpr_peer_computes_in_float32():
    """numexpr takes Python float constants as float64 and computes the chain in float64; the
    other methods compute it in float32."""
    ne = pytest.importorskip("numexpr")
    x = np.random.default_rng(0).standard_normal(1000, dtype=np.float32)
    y = ne.evaluate(parrun.bench.NUMEXPR_CHAIN, local_dict=parrun.bench.numexpr_locals(x))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, parrun.bench._chain(x), rtol=1e-5, atol=1e-6)


def test_a_default_of_too_many_workers_is_refused_as_workers_would_be():
    r = subprocess.run([sys.executable, "-m", "parrun", "bench", "--quick", "--suite", "tasks",
                        "--no-progress"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PARRUN_NUM_WORKERS": str(
                           parrun.bench.MAX_WORKERS_PER_CPU * (os.cpu_count() or 1) + 1)})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "measures only oversubscription; pass --workers" in r.stderr, r.stderr


def test_a_method_runs_only_the_counts_it_can_and_says_which_it_skipped():
    """numba's and numexpr's thread pools have a most: larger counts are reported as skipped
    (numba's row once ran 2 threads as "4", and numexpr's failed whole)."""
    made: list[int] = []

    def make(w):
        made.append(w)
        return lambda: None
    wl = parrun.bench.Workload("toy", "items/s", 1, [
        parrun.bench.Method("capped", make, max_workers=2, over_max="runs at most 2"),
        parrun.bench.Method("capped, one pool", make, max_workers=1, over_max="at most 1",
                            exclusive=True)])
    rows = parrun.bench._measure(wl, [1, 2, 4], repeat=1, warmup=0)
    assert made == [1, 2, 1]
    assert set(rows["capped"]["times_s"]) == {"1", "2"}
    assert rows["capped"]["skipped_at"] == {"4": "runs at most 2"}
    assert rows["capped, one pool"]["skipped_at"] == {"2": "at most 1", "4": "at most 1"}
    table = parrun.bench.format_table("toy", {"unit": "items/s", "work": 1, "note": "",
                                              "methods": rows})
    assert "skipped: at 4 workers: runs at most 2" in table, table
    assert parrun.bench._results_problem({"workloads": {"toy": {
        "unit": "items/s", "work": 1, "note": "", "methods": rows}}}) is None


def test_the_table_counts_serial_as_a_peer_and_gives_a_copy_no_efficiency():
    copy = {"times_s": {"1": [0.1], "2": [0.05]}, "scales": True, "ceiling": True}
    methods = {"serial s": {"times_s": {"1": [1.0]}, "scales": False},
               "parrun x": {"times_s": {"1": [1.25], "2": [0.5]}, "scales": True},
               "threads": {"times_s": {"1": [2.0], "2": [0.8]}, "scales": True},
               "plain copy, forked (bandwidth reference)": {**copy, "same_work": False}}
    for m in (methods, {**methods, "plain copy, forked": copy}):  # and as older files say it
        wl = {"unit": "items/s", "work": 1, "note": "", "methods": m}
        table = parrun.bench.format_table("toy", wl).splitlines()
        parrun_1, parrun_2 = (line for line in table if line.startswith("parrun x"))
        assert parrun_1.endswith("0.80x"), table  # serial's 1.0 s beats it at 1 worker
        assert parrun_2.endswith("1.60x"), table  # threads' 0.8 s at 2
        rows = parrun.bench._summary(wl)
        assert all(r["efficiency"] is None for r in rows if r["method"].startswith("plain copy"))
        assert [r["efficiency"] for r in rows if r["method"] == "threads"] == [0.5, 0.625]


def test_demo_runs_and_checks_its_results():
    """The README's first command runs ``python -m parrun demo``: it measures, prints, and
    fails if parrun's results differ from the serial ones."""
    r = subprocess.run([sys.executable, "-m", "parrun", "demo", "--n", "300000", "--repeat",
                        "2", "--tasks", "60", "--workers", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "parrun.map, 2 workers" in r.stdout and "results match: True" in r.stdout, r.stdout
    for bad, says in (("--workers=0", "needs at least 1, got 0"),
                      ("--repeat=0", "needs at least 1, got 0"),
                      ("--n=x", "not a whole number")):
        r = subprocess.run([sys.executable, "-m", "parrun", "demo", bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_without_one_worker_the_empty_speed_up_is_explained(tmp_path):
    r = subprocess.run([sys.executable, "-m", "parrun", "bench", "--quick", "--suite",
                        "mandelbrot", "--workers", "2", "--no-progress", "--skip", "ray"],
                       capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no 1 in --workers: speed-up over 1 worker is left empty" in r.stderr, r.stderr
