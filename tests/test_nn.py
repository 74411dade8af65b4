"""parrun.nn workloads against their serial NumPy references and, where installed, torch."""

from __future__ import annotations

import os

import numpy as np
import pytest

import parrun
from parrun import nn

RTOL = {np.float32: 1e-4, np.float64: 1e-9}


def _mlp_args(rng, batch, d_in, d_hidden, d_out, dtype):
    x = rng.standard_normal((batch, d_in)).astype(dtype)
    w1 = (rng.standard_normal((d_in, d_hidden)) / np.sqrt(d_in)).astype(dtype)
    b1 = rng.standard_normal(d_hidden).astype(dtype)
    w2 = (rng.standard_normal((d_hidden, d_out)) / np.sqrt(d_hidden)).astype(dtype)
    b2 = rng.standard_normal(d_out).astype(dtype)
    return x, w1, b1, w2, b2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("shape", [(1, 8, 16, 4), (333, 64, 200, 33), (4096, 32, 64, 16)])
def test_mlp_matches_reference(pool, dtype, activation, shape):
    rng = np.random.default_rng(0)
    args = _mlp_args(rng, *shape, dtype)
    y = nn.mlp(*args, activation=activation, pool=pool)
    np.testing.assert_allclose(y, nn.mlp_reference(*args, activation), rtol=RTOL[dtype],
                               atol=RTOL[dtype])
    assert y.dtype == dtype and y.shape == (shape[0], shape[3])
    y.release()


@pytest.mark.parametrize("workers", [1, 2, 3, 8, 16, 64])
@pytest.mark.parametrize("rows", [1, 7, 255, 512, 1000, 4096, 4097, 100_000])
def test_mlp_tiles_are_tall_yet_every_worker_gets_rows(rows, workers):
    """BLAS packs the whole weight matrix for every tile, so tiles stay tall (>= TILE_ROWS rows
    whenever the batch gives each worker that many) and there are at most two a worker; only a
    batch too small for that is cut finer, one piece a worker."""
    from parrun.nn._mlp import MAX_TILE_ROWS, TILE_ROWS, default_grain

    grain = default_grain(rows, workers)
    pieces = -(-rows // grain)
    share = -(-rows // workers)
    if rows >= workers * TILE_ROWS:
        assert TILE_ROWS <= grain <= max(MAX_TILE_ROWS, share)
        assert pieces <= 2 * workers or grain == MAX_TILE_ROWS
    else:  # one piece a worker, none longer than a worker's share
        assert grain == share and pieces <= workers


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("shape,slices,grain", [((333, 64, 200, 33), 3, None),
                                                ((4096, 32, 64, 16), 4, None),
                                                ((7, 8, 5, 4), 5, 2), ((1, 8, 16, 4), 2, None),
                                                ((50, 8, 16, 4), 16, 1000)])
def test_mlp_with_the_hidden_layer_in_slices_matches_reference(pool, dtype, activation, shape,
                                                               slices, grain):
    """Blocks of rows times slices of the hidden layer, each into its own partial output,
    then summed: the reference's numbers, for slices that do not divide the hidden layer,
    one column wide, or a block taller than the batch."""
    rng = np.random.default_rng(2)
    args = _mlp_args(rng, *shape, dtype)
    out = np.full((shape[0], shape[3]), np.nan, dtype)  # a plain array: written through
    y = nn.mlp(*args, activation=activation, pool=pool, out=out, hidden_slices=slices,
               grain=grain)
    assert y is out
    np.testing.assert_allclose(y, nn.mlp_reference(*args, activation), rtol=RTOL[dtype],
                               atol=RTOL[dtype])


def test_mlp_hidden_slices_take_an_empty_batch_and_reject_bad_values(pool):
    args = _mlp_args(np.random.default_rng(3), 64, 16, 32, 8, np.float32)
    empty = nn.mlp(args[0][:0], *args[1:], pool=pool, hidden_slices=2)
    assert empty.shape == (0, 8)
    empty.release()
    for bad in (0, 33):
        with pytest.raises(ValueError, match=rf"hidden_slices must be from 1 to d_hidden "
                                             rf"\(32\), got {bad}"):
            nn.mlp(*args, pool=pool, hidden_slices=bad)
    for bad, name in ((2.0, "float"), (True, "bool"), (None, "NoneType")):
        with pytest.raises(TypeError, match=f"hidden_slices must be an int, got {name}"):
            nn.mlp(*args, pool=pool, hidden_slices=bad)
    with pytest.raises(ValueError, match="grain must be greater than 0, got 0"):
        nn.mlp(*args, pool=pool, hidden_slices=2, grain=0)
    with pytest.raises(TypeError, match="grain must be an int, got float"):
        nn.mlp(*args, pool=pool, hidden_slices=2, grain=1.5)


def test_mlp_hidden_slices_give_every_worker_as_many_pieces():
    """With the hidden layer in slices, the default blocks are at most MAX_TILE_ROWS rows,
    and where the rows divide among the workers and the blocks fit under that, blocks x
    slices pieces are a multiple of the workers (2 workers and 3 slices: 6 pieces, not 3)."""
    from parrun.nn._mlp import MAX_TILE_ROWS, slices_grain

    for rows in (1, 96, 4096, 4800, 100_000):
        for workers in (1, 2, 3, 8, 16):
            for slices in (1, 2, 3, 4, 16):
                grain = slices_grain(rows, workers, slices)
                blocks = -(-rows // grain)
                assert 1 <= grain <= MAX_TILE_ROWS
                if rows % workers == 0 and grain < MAX_TILE_ROWS:
                    assert blocks * slices % workers == 0, (rows, workers, slices, grain)


@pytest.mark.timeout(120)
def test_mlp_hidden_slices_recover_a_dead_worker(pool, tmp_path, monkeypatch):
    """A worker that dies in a piece: its pieces run again (each partial is written from x
    and the weights alone), as they do with rows alone; the numbers are the reference's."""
    from parrun.nn import _mlp

    flag = tmp_path / "die"

    class DieOnce(_mlp._MLPSlices):
        def __call__(self, pieces):
            try:
                os.remove(flag)  # the first worker to get here dies
            except FileNotFoundError:
                return super().__call__(pieces)
            os._exit(3)

    monkeypatch.setattr(_mlp, "_MLPSlices", DieOnce)
    args = _mlp_args(np.random.default_rng(6), 64, 8, 12, 8, np.float64)
    flag.touch()
    y = nn.mlp(*args, pool=pool, hidden_slices=2, grain=8)
    assert not flag.exists()  # a worker did die
    np.testing.assert_allclose(y, nn.mlp_reference(*args), rtol=1e-12)
    y.release()


def test_mlp_releases_what_it_allocated_when_a_worker_raises(pool, monkeypatch):
    from conftest import shm_segments

    from parrun.nn import _mlp

    class Boom(_mlp._MLPSlices):
        def __call__(self, pieces):
            raise RuntimeError("boom in a piece")

    monkeypatch.setattr(_mlp, "_MLPSlices", Boom)
    args = [parrun.asshared(a) for a in _mlp_args(np.random.default_rng(7), 16, 8, 12, 4,
                                                  np.float32)]
    try:
        before = set(shm_segments(os.getpid()))
        with pytest.raises(RuntimeError, match="boom in a piece") as e:
            nn.mlp(*args, pool=pool, hidden_slices=2)
        assert set(shm_segments(os.getpid())) == before, e  # the exception still alive
    finally:
        for a in args:
            a.release()


def test_a_released_mlp_model_says_so(pool):
    _, w1, b1, w2, b2 = _mlp_args(np.random.default_rng(8), 1, 8, 12, 4, np.float32)
    model = nn.MLPModel(w1, b1, w2, b2, pool=pool)
    model.predict(np.ones((3, 8), np.float32), hidden_slices=2).release()
    model.release()
    for call in (lambda: model.predict(np.ones((3, 8), np.float32)),
                 lambda: next(model.predict_many([np.ones((3, 8), np.float32)]))):
        with pytest.raises(ValueError, match="this MLPModel was released"):
            call()
    model.release()  # again: nothing left to free


def test_erf_is_accurate():
    import math

    x = np.linspace(-6, 6, 2001)
    ref = np.array([math.erf(t) for t in x])
    assert np.max(np.abs(nn.erf(x) - ref)) < 2e-7


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_fused_bias_activation_and_layer_norm(dtype, contiguous):
    """The fused kernels (numba) and the NumPy fallback (taken for strided rows) agree with
    exact math: GELU via math.erf, LayerNorm in float64."""
    import math

    from parrun.nn import _ops

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((37, 300)) * 4).astype(dtype)
    b = rng.standard_normal(300).astype(dtype)
    v = x.astype(np.float64) + b
    gelu = v * 0.5 * (1 + np.array([math.erf(t / math.sqrt(2)) for t in v.ravel()]).reshape(
        v.shape))
    tol = 2e-6 if dtype == np.float32 else 1e-12
    for act, ref in (("gelu", gelu), ("relu", np.maximum(v, 0))):
        y = x.copy() if contiguous else np.asfortranarray(x)
        assert _ops.bias_act_(y, b, act) is y
        assert np.max(np.abs(y - ref) / np.maximum(1, np.abs(ref))) < tol, act

    r = rng.standard_normal((37, 300)).astype(dtype)
    g, bb = rng.standard_normal(300).astype(dtype), rng.standard_normal(300).astype(dtype)
    s = x.astype(np.float64) + r
    ref = (s - s.mean(1, keepdims=True)) / np.sqrt(s.var(1, keepdims=True) + 1e-12) * g + bb
    y = x.copy() if contiguous else np.asfortranarray(x)
    assert _ops.add_layer_norm_(y, r, g, bb, 1e-12) is y
    np.testing.assert_allclose(y, ref, rtol=1e-5 if dtype == np.float32 else 1e-10,
                               atol=1e-5 if dtype == np.float32 else 1e-10)


def test_softmax_step_fused_matches_numpy():
    """The numba online-softmax step (its own vectorised exp) against NumPy's exp, over two
    blocks, with masked keys and a query whose keys are all masked in the first block."""
    from parrun.nn import _ops

    rng = np.random.default_rng(4)
    blocks = [(rng.standard_normal((3, 70, 45)) * 8).astype(np.float32) for _ in range(2)]
    blocks[0][:, 10:20, 5] = -np.inf
    blocks[0][1, :, 7] = -np.inf  # query 7 of group 1 sees nothing in the first block
    results = []
    for fused in (True, False):
        m = np.full((3, 1, 45), -np.inf, np.float32)
        denom = np.zeros((3, 1, 45), np.float32)
        outs = []
        for b in blocks:
            # A Fortran-ordered copy takes the NumPy path; a C-ordered one the fused kernel.
            st = b.copy() if fused else np.asfortranarray(b)
            corr = _ops.softmax_step_(st, m, denom)
            outs.append((st.copy(), corr.copy(), m.copy(), denom.copy()))
        results.append(outs)
    for got, ref in zip(*results):
        for a, r in zip(got, ref):
            np.testing.assert_allclose(a, r, rtol=5e-7, atol=1e-30)
    first, second = results[0]
    assert (first[0][:, 10:20, 5] == 0).all()  # masked keys weigh exactly 0
    assert second[1][1, 0, 7] == 0 and np.isfinite(second[3]).all()


def test_mlp_rejects_bad_input(pool):
    args = _mlp_args(np.random.default_rng(0), 4, 8, 16, 4, np.float32)
    with pytest.raises(ValueError, match="activation"):
        nn.mlp(*args, activation="tanh", pool=pool)
    with pytest.raises(TypeError, match="dtype"):
        nn.mlp(args[0], args[1].astype(np.float64), *args[2:], pool=pool)
    with pytest.raises(ValueError, match="do not chain"):
        nn.mlp(args[0][:, :5], *args[1:], pool=pool)
    with pytest.raises(TypeError, match="float32 or float64"):
        nn.mlp(args[0].astype(np.int32), *args[1:], pool=pool)


def test_mlp_model_predict_and_stream(pool):
    rng = np.random.default_rng(1)
    _, w1, b1, w2, b2 = _mlp_args(rng, 10, 16, 32, 8, np.float32)
    model = nn.MLPModel(w1, b1, w2, b2, "gelu", pool=pool)
    try:
        batches = [rng.standard_normal((n, 16)).astype(np.float32) for n in (5, 1, 17, 64, 3)]
        outs = list(model.predict_many(iter(batches)))
        assert len(outs) == len(batches)
        for b, o in zip(batches, outs):
            np.testing.assert_allclose(o, nn.mlp_reference(b, w1, b1, w2, b2, "gelu"),
                                       rtol=1e-4, atol=1e-5)
        y = model.predict(batches[3])
        np.testing.assert_allclose(y, outs[3], rtol=1e-5, atol=1e-6)
        y.release()
        y = model.predict(batches[3], hidden_slices=3)
        np.testing.assert_allclose(y, outs[3], rtol=1e-5, atol=1e-6)
        y.release()
    finally:
        model.release()


@pytest.mark.timeout(120)
def test_mlp_model_hidden_slices_from_many_threads(pool):
    """The model keeps one scratch for the hidden slices' partial outputs: threads predicting
    at once must not write into each other's (a thread that finds it taken makes its own)."""
    import concurrent.futures as cf

    rng = np.random.default_rng(5)
    _, w1, b1, w2, b2 = _mlp_args(rng, 1, 32, 64, 16, np.float32)
    model = nn.MLPModel(w1, b1, w2, b2, pool=pool)
    xs = [rng.standard_normal((200, 32)).astype(np.float32) for _ in range(4)]
    refs = [nn.mlp_reference(x, w1, b1, w2, b2) for x in xs]
    try:
        def predict(i):
            y = model.predict(xs[i % 4], hidden_slices=4)
            ok = np.allclose(y, refs[i % 4], rtol=1e-4, atol=1e-4)
            y.release()
            return ok
        with cf.ThreadPoolExecutor(4) as ex:
            assert all(ex.map(predict, range(40)))
    finally:
        model.release()


def _qkv(rng, b, h, s, d, dtype, sk=None):
    q = rng.standard_normal((b, h, s, d)).astype(dtype)
    k = rng.standard_normal((b, h, sk or s, d)).astype(dtype)
    v = rng.standard_normal((b, h, sk or s, d)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 7, 8), (2, 3, 200, 16), (1, 2, 130, 32)])
def test_attention_matches_reference(pool, dtype, causal, shape):
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, *shape, dtype)
    o = nn.attention(q, k, v, causal=causal, pool=pool, block_q=64, block_k=48)
    np.testing.assert_allclose(o, nn.attention_reference(q, k, v, causal), rtol=RTOL[dtype],
                               atol=RTOL[dtype])
    o.release()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sk", [77, 33])
def test_attention_masks_and_cross_lengths(pool, causal, sk):
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 2, 2, 50, 8, np.float32, sk=sk)
    keep = rng.random((2, 1, 1, sk)) > 0.3
    keep[..., 0] = True
    for mask in (keep, np.where(keep, 0.0, -1e4).astype(np.float32),
                 rng.standard_normal((2, 2, 50, sk)).astype(np.float32)):
        o = nn.attention(q, k, v, mask=mask, causal=causal, pool=pool, block_q=16,
                         block_k=32)
        np.testing.assert_allclose(o, nn.attention_reference(q, k, v, causal, mask=mask),
                                   rtol=1e-4, atol=1e-5)
        o.release()
    with pytest.raises(ValueError, match="broadcast"):
        nn.attention(q, k, v, mask=keep[..., :5], pool=pool)
    with pytest.raises(ValueError, match="broadcast"):  # broadcasts, but to 5 dimensions
        nn.attention(q, k, v, mask=keep[None, None], pool=pool)
    with pytest.raises(TypeError):
        nn.attention(q, k.astype(np.float64), v, pool=pool)


def test_causal_attention_is_balanced_by_stealing(pool):
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 1, 1, 1024, 16, np.float32)
    ref = nn.attention_reference(q, k, v, True)
    # One head: tiles are its query blocks in order, so the first half (early queries, few
    # keys) costs about a third of the second; the worker given it must steal. The job takes
    # ~15 ms, so a worker the OS leaves unscheduled for that long on a loaded machine sees
    # nothing to steal: up to three runs, each checked, one of which must steal.
    steals = []
    for _ in range(3):
        o = nn.attention(q, k, v, causal=True, pool=pool, block_q=16, block_k=64)
        st = pool.last_stats
        np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-5)
        o.release()
        assert min(w.items for w in st.workers) > 0
        steals.append(st.steals)
        if st.steals:
            break
    assert steals[-1] >= 1, steals




@pytest.fixture(scope="module")
def torch_mod():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mlp_matches_torch(pool, torch_mod, activation):
    F = torch_mod.nn.functional
    rng = np.random.default_rng(5)
    x, w1, b1, w2, b2 = _mlp_args(rng, 129, 48, 96, 20, np.float32)
    t = torch_mod.from_numpy
    h = F.linear(t(x), t(np.ascontiguousarray(w1.T)), t(b1))
    h = F.relu(h) if activation == "relu" else F.gelu(h)
    ref = F.linear(h, t(np.ascontiguousarray(w2.T)), t(b2)).numpy()
    y = nn.mlp(x, w1, b1, w2, b2, activation, pool=pool)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    y.release()


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_torch(pool, torch_mod, causal):
    F = torch_mod.nn.functional
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, 2, 3, 157, 32, np.float32)
    ref = F.scaled_dot_product_attention(*(torch_mod.from_numpy(a) for a in (q, k, v)),
                                         is_causal=causal).numpy()
    o = nn.attention(q, k, v, causal=causal, pool=pool, block_q=64, block_k=48)
    np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-5)
    mask = rng.random((2, 1, 1, 157)) > 0.2
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(*(torch_mod.from_numpy(a) for a in (q, k, v)),
                                         attn_mask=torch_mod.from_numpy(mask)).numpy()
    o2 = nn.attention(q, k, v, mask=mask, pool=pool)
    np.testing.assert_allclose(o2, ref, rtol=1e-4, atol=1e-5)
    o.release()
    o2.release()


try:
    import numba

    @numba.njit
    def _triple(x):
        return x * 3
except ImportError:
    _triple = None


def _triple_signatures(_):
    return len(_triple.signatures)


def test_a_numba_kernel_goes_to_the_workers_by_reference(pool1):
    """map(kernel): the worker runs its own module's dispatcher (so numba's cache, where the
    kernel has one, is used), not a copy rebuilt from the pickle and compiled again."""
    pytest.importorskip("numba")
    x = parrun.asshared(np.arange(10.0))
    y = pool1.map(_triple, x)
    np.testing.assert_array_equal(y, np.arange(10.0) * 3)
    assert pool1.submit(_triple_signatures, 0).result() == 1  # compiled in the module's
    x.release()
    y.release()


def _kernel_stats(_):
    from parrun.nn import _mandelbrot as M

    stats = M.escape_rows.stats
    return sum(stats.cache_hits.values()), sum(stats.cache_misses.values())


@pytest.mark.timeout(60)
def test_workers_load_the_compiled_kernel_from_numbas_cache():
    """A compiled kernel is compiled once per machine, not once per worker: workers use their
    module's dispatcher, which numba loads from its disk cache (a dispatcher shipped by value
    would be rebuilt uncached and compiled again in every worker)."""
    pytest.importorskip("numba")
    from parrun.nn import _mandelbrot as M

    img = np.empty((3, 40), np.int32)
    M.escape_rows(np.arange(3), img, 40, 30, 16, *M.VIEW)  # compiled here, or loaded: cached
    with parrun.Pool(1) as p:  # one worker: the rows and the probe run in the same process
        out = nn.mandelbrot(40, 30, 16, pool=p)
        hits, misses = p.submit(_kernel_stats, 0).result()
        out.release()
    assert hits >= 1 and misses == 0, (hits, misses)


def test_jit_falls_back_to_no_cache_where_numba_cannot_write_one(monkeypatch):
    numba = pytest.importorskip("numba")
    from parrun.nn import _ops

    real = numba.njit

    def njit(*args, **options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file")
        return real(*args, **options)
    monkeypatch.setattr(numba, "njit", njit)

    def double(x):
        return 2 * x
    assert _ops.jit(nogil=True)(double)(21) == 42


def test_mandelbrot_matches_references(pool):
    from parrun.nn import _mandelbrot as M

    ref = M.mandelbrot_numpy(160, 120, 64)
    py = np.empty_like(ref)
    M.escape_rows_py(np.arange(120), py, 160, 120, 64, *M.VIEW)
    np.testing.assert_array_equal(py, ref)
    img = nn.mandelbrot(160, 120, 64, pool=pool)
    np.testing.assert_array_equal(img, ref)
    assert img.dtype == np.int32 and parrun.is_shared(img)
    img.release()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_propagates_nan_and_inf_as_the_reference(pool, dtype, bad):
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 2, 16, 8)).astype(dtype) for _ in range(3))
    k[0, 1, 5, 0] = bad
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, as wanted
        want = nn.attention_reference(q, k, v)
    got = nn.attention(q, k, v, pool=pool)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    # NaN spoils every query of its head; inf those whose score with it is +inf (inf - inf)
    assert np.isnan(want[0, 1]).all() if np.isnan(bad) else np.isnan(want[0, 1]).any()
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=2e-4, atol=2e-5)


def test_predict_many_checks_batches_as_predict_does(pool):
    rng = np.random.default_rng(8)
    w = [rng.standard_normal(s).astype(np.float32) for s in ((3, 5), (5,), (5, 2), (2,))]
    model = nn.MLPModel(*w, pool=pool)
    try:
        with pytest.raises(ValueError, match="shapes"):
            next(model.predict_many([np.ones(3, np.float32)]))
        with pytest.raises(TypeError, match="float64"):
            next(model.predict_many([np.ones((4, 3))]))
        got = next(model.predict_many([np.ones((4, 3), np.float32)]))
        np.testing.assert_allclose(got, model.predict(np.ones((4, 3), np.float32)), rtol=1e-6)
    finally:
        model.release()



@pytest.mark.parametrize("width,height", [(1, 1), (5, 1), (1, 5), (0, 3)])
def test_mandelbrot_of_one_row_or_column(pool, width, height):
    # (width - 1) and (height - 1) divided: one pixel wide or high was a ZeroDivisionError
    img = nn.mandelbrot(width, height, max_iter=50, pool=pool)
    try:
        np.testing.assert_array_equal(img, nn.mandelbrot_numpy(width, height, 50))
    finally:
        img.release()


def test_mandelbrot_checks_its_arguments_and_out(pool):
    # The compiled kernel writes out[r, c] for every column, unchecked: a narrower out was
    # overrun (workers died of SIGSEGV), a wider one half filled.
    for bad in (np.zeros((4, 3), np.int32), np.zeros((4, 7), np.int32),
                np.zeros((4, 6), np.float64), [[0] * 6] * 4):
        with pytest.raises(ValueError, match=r"out must be a writeable integer array of "
                                             r"shape \(4, 6\)"):
            nn.mandelbrot(6, 4, pool=pool, out=bad)
    with pytest.raises(ValueError, match="cannot hold max_iter=300"):
        nn.mandelbrot(6, 4, max_iter=300, pool=pool, out=np.zeros((4, 6), np.int8))
    for kw in ({"width": -1}, {"height": 2.5}, {"max_iter": True}):
        with pytest.raises(ValueError, match="must be an int >= 0"):
            nn.mandelbrot(**{"width": 6, "height": 4, **kw}, pool=pool)
    for view in ((0, 1, 2), (0, 1, 2, np.nan), "abcd"):
        with pytest.raises(ValueError, match="view must be 4 finite numbers"):
            nn.mandelbrot(6, 4, view=view, pool=pool)
    out = np.zeros((4, 6), np.int16)  # any integer dtype that holds max_iter
    nn.mandelbrot(6, 4, max_iter=50, pool=pool, out=out)
    np.testing.assert_array_equal(out, nn.mandelbrot_numpy(6, 4, 50))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_of_a_query_with_every_key_masked_is_zeros(pool, dtype):
    # As torch's scaled_dot_product_attention: 0/0 gave NaN rows here, and in the reference.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 3, 4)).astype(dtype) for _ in range(3))
    pad = np.array([True, True, False])
    keep = pad[:, None] & pad[None, :]  # query 2 sees no key
    for mask in (keep, np.where(keep, 0, -np.inf).astype(dtype)):
        for got in (nn.attention(q, k, v, mask=mask, pool=pool),
                    nn.attention_reference(q, k, v, mask=mask)):
            got = np.asarray(got)
            assert np.isfinite(got).all()
            np.testing.assert_array_equal(got[:, :, 2], 0)
        want = nn.attention_reference(q[:, :, :2], k[:, :, :2], v[:, :, :2])
        np.testing.assert_allclose(np.asarray(got)[:, :, :2], want, rtol=1e-5, atol=1e-6)
    empty = np.zeros((1, 2, 0, 4), dtype)  # no keys at all
    for got in (nn.attention(q, empty, empty, pool=pool),
                nn.attention_reference(q, empty, empty)):
        np.testing.assert_array_equal(np.asarray(got), 0)


def test_nn_names_bad_arguments_with_the_right_exception(pool):
    f = np.float32
    assert float(nn.erf(np.array(0.5))) == pytest.approx(0.5204998778)  # 0-d float64
    with pytest.raises(TypeError, match="out must be a NumPy array, got list"):
        nn.mlp(np.ones((2, 3), f), np.ones((3, 4), f), np.ones(4, f), np.ones((4, 2), f),
               np.ones(2, f), out=[[0, 0]] * 2, pool=pool)
    with pytest.raises(TypeError, match="out must be a NumPy array, got list"):
        nn.attention(*[np.ones((1, 1, 2, 2), f)] * 3, out=[0], pool=pool)
    with pytest.raises(TypeError, match="w1 must be a 2-D float32 or float64 array, got "
                                        "2-D int64"):
        nn.MLPModel(np.ones((3, 4), np.int64), np.ones(4, f), np.ones((4, 2), f),
                    np.ones(2, f), pool=pool)
    with pytest.raises(TypeError, match="w1 must be a 2-D float32 or float64 array, got 0-D"):
        nn.MLPModel(np.float32(1), np.ones(4, f), np.ones((4, 2), f), np.ones(2, f),
                    pool=pool)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_attention_in_place_is_right(pool, which):
    # out=q (or k, v): a tile overwrote rows that other tiles still read (errors of 0.26-0.94).
    rng = np.random.default_rng(0)
    qkv = {n: parrun.asshared(rng.standard_normal((1, 2, 96, 8)).astype(np.float32))
           for n in "qkv"}
    try:
        want = nn.attention_reference(qkv["q"], qkv["k"], qkv["v"])
        got = nn.attention(qkv["q"], qkv["k"], qkv["v"], out=qkv[which], pool=pool,
                           block_q=16, block_k=16)
        assert got is qkv[which]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    finally:
        for a in qkv.values():
            a.release()


def test_attention_refuses_integer_masks_and_odd_flags(pool):
    # A 0/1 integer mask (a tokenizer's attention_mask) was added to the scores: it masked
    # nothing. torch refuses it too.
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, 4, 8)).astype(np.float32)
    keep = np.array([1, 1, 0, 0])
    with pytest.raises(TypeError, match="astype\\(bool\\)"):
        nn.attention(q, q, q, mask=keep, pool=pool)
    got = nn.attention(q, q, q, mask=keep.astype(bool), pool=pool)
    np.testing.assert_allclose(got, nn.attention_reference(q, q, q, mask=keep.astype(bool)),
                               rtol=1e-5, atol=1e-6)
    half = np.where(keep, 0, -np.inf).astype(np.float16)  # another float width: cast
    np.testing.assert_allclose(nn.attention(q, q, q, mask=half, pool=pool), got, atol=1e-6)
    with pytest.raises(TypeError, match="causal must be a bool"):
        nn.attention(q, q, q, causal="yes", pool=pool)
    with pytest.raises(TypeError, match="scale must be a number"):
        nn.attention(q, q, q, scale="2", pool=pool)


def test_mlp_model_keeps_read_only_copies_of_its_own(pool):
    # Shared weights were the caller's: release() freed them (and their whole segment), and
    # an in-place change reached predict but not hidden_slices' cached w1 transposed.
    rng = np.random.default_rng(2)
    x, w1, b1, w2, b2 = _mlp_args(rng, 64, 6, 8, 4, np.float32)
    shared = [parrun.asshared(a) for a in (w1, b1, w2, b2)]
    try:
        m = nn.MLPModel(*shared, pool=pool)
        want = nn.mlp_reference(x, w1, b1, w2, b2)
        for s in (1, 2):
            np.testing.assert_allclose(m.predict(x, hidden_slices=s), want, rtol=1e-5,
                                       atol=1e-5)
        with pytest.raises(ValueError, match="read-only"):
            m.w1[...] *= 2
        shared[0] *= 2  # the caller's array: not the model's
        for s in (1, 2):
            np.testing.assert_allclose(m.predict(x, hidden_slices=s), want, rtol=1e-5,
                                       atol=1e-5)
        m.release()
        assert all(parrun.is_shared(a) for a in shared)  # still the caller's
        np.testing.assert_array_equal(pool.map(np.negative, shared[1]), -b1)
        with pytest.raises(ValueError, match="in_flight must be 1 or more"):
            next(nn.MLPModel(*shared, pool=pool).predict_many([x], in_flight=0))
    finally:
        for a in shared:
            a.release()


def test_nn_edge_inputs(pool):
    rng = np.random.default_rng(3)
    x, w1, b1, w2, b2 = _mlp_args(rng, 5, 3, 0, 2, np.float64)  # no hidden units
    np.testing.assert_allclose(nn.mlp(x, w1, b1, w2, b2, pool=pool), np.tile(b2, (5, 1)))
    x, w1, b1, w2, b2 = _mlp_args(rng, 5, 3, 4, 2, np.float64)
    lists = [a.tolist() for a in (x, w1, b1, w2, b2)]  # was AttributeError: 'list' ... shape
    np.testing.assert_allclose(nn.mlp(*lists, pool=pool), nn.mlp_reference(x, w1, b1, w2, b2))
    import math
    for v in (np.float32(0.5), np.array(0.5, np.float32), np.array(0.5, np.float16)):
        assert abs(float(nn.erf(v)) - math.erf(0.5)) < 1e-3  # 0-d: was a TypeError
    with pytest.raises(TypeError, match="floating-point"):
        nn.erf(np.arange(3))
    assert nn.mandelbrot(0, 0, 2**31 + 5, pool=pool).dtype == np.int64  # int32 wrapped
